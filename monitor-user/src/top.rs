//! `hive-monitor top`: a live table of the workers. A presenter of the heartbeat model only:
//! the heartbeats come from the local daemon's pull API when it answers, else from probes
//! this command loads itself.
use std::{
    cmp::Ordering,
    collections::VecDeque,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table},
    Frame,
};

use crate::{
    error::{Error, Result},
    heartbeat::{self, Heartbeat, HiveIdentity, Worker},
    probes::monotonic_ns,
    record::Reader,
    sampler::{BpfMode, Sampler, SamplerOptions},
    sources::cgroup::Slice,
};

/// Samples the detail pane draws for the selected worker.
pub const HISTORY: usize = 60;
/// Run-queue wait above this share of the interval is highlighted: the worker's tasks
/// wait for a CPU more than they should.
pub const RUNQ_ALERT_PCT: f64 = 10.0;
/// Rows of the detail pane: a title and one sparkline per figure.
const DETAIL_ROWS: u16 = 1 + SERIES.len() as u16;
/// The detail pane is drawn when the table keeps at least this many rows beside it.
const MIN_TABLE_ROWS: u16 = 4;
/// Title, host vitals, and the most stalled workers.
const HEADER_ROWS: u16 = 3;

/// Smallest terminal the view draws into; below it, it says so instead.
pub const MIN_WIDTH: u16 = 30;
pub const MIN_HEIGHT: u16 = 5;

/// A column: header, width, and how it reads and orders a worker.
struct Column {
    title: &'static str,
    width: u16,
    text: fn(&Worker) -> String,
    key: fn(&Worker) -> Key,
}

/// What a column sorts by; a missing figure sorts below every present one.
#[derive(PartialEq, PartialOrd)]
enum Key {
    Missing,
    Num(f64),
    Text(String),
}

fn num(v: Option<f64>) -> Key {
    v.map_or(Key::Missing, Key::Num)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.digits$}"))
}

/// In the order shown; when the terminal is narrow the rightmost are left out.
const COLUMNS: [Column; 10] = [
    Column {
        title: "WORKER",
        width: 13,
        text: |w| format!("{}/{}", w.group, w.instance),
        key: |w| Key::Text(format!("{}/{}", w.group, w.instance)),
    },
    Column {
        title: "PID",
        width: 7,
        text: |w| w.pid.map_or_else(|| "n/a".into(), |p| p.to_string()),
        key: |w| num(w.pid.map(f64::from)),
    },
    Column { title: "CPU%", width: 6, text: |w| fmt(w.cpu_pct, 1), key: |w| num(w.cpu_pct) },
    Column {
        title: "MEM MB",
        width: 6,
        text: |w| fmt(w.rss_mb.map(|v| v as f64), 0),
        key: |w| num(w.rss_mb.map(|v| v as f64)),
    },
    Column { title: "RD MB/s", width: 7, text: |w| fmt(w.io_r_mb_s, 1), key: |w| num(w.io_r_mb_s) },
    Column { title: "WR MB/s", width: 7, text: |w| fmt(w.io_w_mb_s, 1), key: |w| num(w.io_w_mb_s) },
    Column { title: "GPU%", width: 5, text: |w| fmt(w.gpu_util_pct, 0), key: |w| num(w.gpu_util_pct) },
    Column {
        title: "VRAM MB",
        width: 7,
        text: |w| fmt(w.vram_mb.map(|v| v as f64), 0),
        key: |w| num(w.vram_mb.map(|v| v as f64)),
    },
    Column { title: "RUNQ%", width: 5, text: |w| fmt(w.runq_wait_pct, 1), key: |w| num(w.runq_wait_pct) },
    Column {
        title: "MODEL",
        width: 8,
        text: |w| w.model.as_deref().unwrap_or("n/a").to_string(),
        key: |w| w.model.as_deref().map_or(Key::Missing, |m| Key::Text(m.to_string())),
    },
];

/// A figure of the detail pane: label, how it reads a worker, and its unit.
struct Series {
    label: &'static str,
    value: fn(&Worker) -> Option<f64>,
    unit: &'static str,
}

const SERIES: [Series; 9] = [
    Series { label: "CPU%", value: |w| w.cpu_pct, unit: "%" },
    Series { label: "RUNQ%", value: |w| w.runq_wait_pct, unit: "%" },
    Series { label: "RD MB/s", value: |w| w.io_r_mb_s, unit: " MB/s" },
    Series { label: "WR MB/s", value: |w| w.io_w_mb_s, unit: " MB/s" },
    Series { label: "GPU%", value: |w| w.gpu_util_pct, unit: "%" },
    Series { label: "VRAM", value: |w| w.vram_mb.map(|v| v as f64), unit: " MB" },
    Series { label: "PSI cpu", value: |w| w.pressure.cpu.as_ref().and_then(|p| p.some_pct), unit: "%" },
    Series { label: "PSI mem", value: |w| w.pressure.memory.as_ref().and_then(|p| p.some_pct), unit: "%" },
    Series { label: "PSI io", value: |w| w.pressure.io.as_ref().and_then(|p| p.some_pct), unit: "%" },
];

/// What the user chose: the sort column and direction, the selected row, the help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub sort: usize,
    pub descending: bool,
    /// Index into the sorted rows.
    pub selected: usize,
    pub help: bool,
}

impl Default for View {
    /// Busiest first.
    fn default() -> Self {
        Self { sort: 2, descending: true, selected: 0, help: false }
    }
}

impl View {
    /// Applies a key; returns false when the key means quit.
    pub fn key(&mut self, code: KeyCode) -> bool {
        match code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Right | KeyCode::Char('>') | KeyCode::Tab => self.sort = (self.sort + 1) % COLUMNS.len(),
            KeyCode::Left | KeyCode::Char('<') | KeyCode::BackTab => {
                self.sort = (self.sort + COLUMNS.len() - 1) % COLUMNS.len()
            }
            KeyCode::Char('r') => self.descending = !self.descending,
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => self.selected = self.selected.saturating_add(1),
            KeyCode::Char('?') => self.help = !self.help,
            KeyCode::Char(c @ '0'..='9') => self.sort = (c as usize - '0' as usize + 9) % 10,
            _ => {}
        }
        true
    }
}

/// Where the heartbeats come from, named in the header.
pub enum Feed {
    /// The daemon's pull API at this URL.
    Daemon(String),
    /// Probes loaded by this command.
    Own,
    /// A record (`run --record DIR`), at a past moment.
    Record(String),
}

/// The keys, for the `?` overlay.
const HELP: [&str; 9] = [
    "↑/↓ j/k     select a worker (its detail below)",
    "←/→ 1-0     sort column",
    "r           reverse the sort",
    "[ / ]       with --record: one heartbeat back / on",
    "{ / }       with --record: one minute back / on",
    "?           this help",
    "q Esc ^C    quit",
    "",
    "RUNQ% above 10 is shown in red.",
];

/// Draws the newest heartbeat of `history` (or a notice while there is none) into the
/// whole frame, with the selected worker's figures over `history` below the table.
pub fn render(frame: &mut Frame, history: &[Heartbeat], view: View, feed: &Feed, status: &str) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let msg =
            format!("terminal too small: {}x{}, need {MIN_WIDTH}x{MIN_HEIGHT}", area.width, area.height);
        frame.render_widget(Paragraph::new(msg), area);
        return;
    }
    let detail_rows = match area.height >= HEADER_ROWS + 1 + DETAIL_ROWS + MIN_TABLE_ROWS {
        true => DETAIL_ROWS,
        false => 0,
    };
    let [header, table, detail, footer] = Layout::vertical([
        Constraint::Length(HEADER_ROWS),
        Constraint::Min(1),
        Constraint::Length(detail_rows),
        Constraint::Length(1),
    ])
    .areas(area);
    let source = match feed {
        Feed::Daemon(url) => format!("daemon {url}"),
        Feed::Own => "own probes".into(),
        Feed::Record(dir) => format!("record {dir}"),
    };
    let Some(hb) = history.last() else {
        frame.render_widget(
            Paragraph::new(vec![Line::from(format!("hive-monitor top — {source}")), Line::from(status)]),
            header,
        );
        return;
    };
    let h = &hb.hive;
    let host = format!(
        "host CPU {}%  RAM {}/{} GB  GPUs {}  workers {}",
        fmt(h.cpu_usage_percent, 1),
        fmt(h.ram_used_gb, 1),
        fmt(h.ram_total_gb, 1),
        h.vram_per_device.as_ref().map_or_else(|| "n/a".into(), |d| d.len().to_string()),
        hb.workers.len(),
    );
    let title = format!("{} {}  #{}  {}", h.id, hb.timestamp, hb.seq, source);
    let lines = vec![Line::from(title), Line::from(host), Line::from(stalls(&hb.workers))];
    frame.render_widget(Paragraph::new(lines), header);
    let rows = sorted(&hb.workers, view);
    let selected = view.selected.min(rows.len().saturating_sub(1));
    frame.render_widget(worker_table(&rows, view, selected, table), table);
    if let Some(w) = rows.get(selected).filter(|_| detail_rows > 0) {
        render_detail(frame, history, w, detail);
    }
    let order = if view.descending { "▼" } else { "▲" };
    let help = format!(
        "sort: {} {order}   q quit  ↑/↓ select  ←/→ sort  r reverse  ? help",
        COLUMNS[view.sort].title
    );
    frame.render_widget(Paragraph::new(if status.is_empty() { help.as_str() } else { status }), footer);
    if view.help {
        let width = (HELP.iter().map(|l| l.chars().count()).max().unwrap_or(0) as u16 + 4).min(area.width);
        let height = (HELP.len() as u16 + 2).min(area.height);
        let popup = Rect {
            x: area.x + (area.width - width) / 2,
            y: area.y + (area.height - height) / 2,
            width,
            height,
        };
        frame.render_widget(Clear, popup);
        let lines: Vec<Line> = HELP.iter().map(|l| Line::from(*l)).collect();
        frame.render_widget(
            Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" keys ")),
            popup,
        );
    }
}

/// The workers whose tasks stalled most (pressure `some`, the highest of CPU, memory and
/// I/O), each with its three shares; the line is cut at the terminal's edge.
fn stalls(workers: &[Worker]) -> String {
    let shares = |w: &Worker| {
        let p = &w.pressure;
        [&p.cpu, &p.memory, &p.io].map(|r| r.as_ref().and_then(|r| r.some_pct))
    };
    let mut ranked: Vec<(&Worker, [Option<f64>; 3])> = workers.iter().map(|w| (w, shares(w))).collect();
    let worst = |s: &[Option<f64>; 3]| s.iter().flatten().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
    ranked.sort_by(|a, b| worst(&b.1).partial_cmp(&worst(&a.1)).unwrap_or(Ordering::Equal));
    let mut line = String::from("stall% cpu/mem/io");
    for (w, [c, m, i]) in ranked {
        line += &format!("  {}/{} {}/{}/{}", w.group, w.instance, fmt(c, 0), fmt(m, 0), fmt(i, 0));
    }
    line
}

/// The selected worker's figures over the heartbeats in `history` (one sparkline each, the
/// newest on the right) with the newest value.
fn render_detail(frame: &mut Frame, history: &[Heartbeat], worker: &Worker, area: Rect) {
    let same = |w: &&Worker| w.group == worker.group && w.instance == worker.instance;
    let title = format!(
        "{}/{}  pid {}  model {}  last {} samples",
        worker.group,
        worker.instance,
        worker.pid.map_or_else(|| "n/a".into(), |p| p.to_string()),
        worker.model.as_deref().unwrap_or("n/a"),
        history.len().min(HISTORY),
    );
    let rows = Layout::vertical([Constraint::Length(1); DETAIL_ROWS as usize]).split(area);
    frame.render_widget(Paragraph::new(title).style(Style::default().add_modifier(Modifier::BOLD)), rows[0]);
    for (series, &row) in SERIES.iter().zip(&rows[1..]) {
        let [label, spark, value] =
            Layout::horizontal([Constraint::Length(8), Constraint::Min(1), Constraint::Length(12)])
                .areas(row);
        let points: Vec<Option<f64>> = history
            .iter()
            .rev()
            .take(HISTORY.min(spark.width as usize))
            .map(|hb| hb.workers.iter().find(same).and_then(series.value))
            .collect();
        // Hundredths, so that figures below one still draw.
        let bars: Vec<Option<u64>> =
            points.iter().rev().map(|v| v.map(|v| (v.max(0.0) * 100.0) as u64)).collect();
        let newest = (series.value)(worker);
        let alert = series.label == "RUNQ%" && newest.is_some_and(|v| v > RUNQ_ALERT_PCT);
        let style = match alert {
            true => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            false => Style::default().fg(Color::Cyan),
        };
        frame.render_widget(Paragraph::new(series.label), label);
        frame.render_widget(Sparkline::default().data(bars).style(style), spark);
        let text = newest.map_or_else(|| " n/a".into(), |v| format!(" {v:.1}{}", series.unit));
        frame.render_widget(Paragraph::new(text).style(style), value);
    }
}

fn sorted(workers: &[Worker], view: View) -> Vec<&Worker> {
    let mut rows: Vec<&Worker> = workers.iter().collect();
    let key = COLUMNS[view.sort].key;
    rows.sort_by(|a, b| {
        let o = key(a).partial_cmp(&key(b)).unwrap_or(Ordering::Equal);
        if view.descending {
            o.reverse()
        } else {
            o
        }
    });
    rows
}

fn worker_table(rows: &[&Worker], view: View, selected: usize, area: Rect) -> Table<'static> {
    // As many columns as fit, left to right, one space apart.
    let mut used = 0;
    let shown: Vec<usize> = (0..COLUMNS.len())
        .take_while(|&i| {
            used += COLUMNS[i].width + u16::from(i > 0);
            used <= area.width
        })
        .collect();
    // The sort column's title is shown bold and not inverted; the footer names it.
    let header = Row::new(shown.iter().map(|&i| {
        let cell = Cell::from(COLUMNS[i].title);
        match i == view.sort {
            true => cell.style(Style::default().add_modifier(Modifier::BOLD)),
            false => cell.style(Style::default().add_modifier(Modifier::REVERSED)),
        }
    }));
    let body = rows.iter().enumerate().map(|(n, w)| {
        let row = Row::new(shown.iter().map(|&i| {
            let cell = Cell::from((COLUMNS[i].text)(w));
            match COLUMNS[i].title == "RUNQ%" && w.runq_wait_pct.is_some_and(|v| v > RUNQ_ALERT_PCT) {
                true => cell.style(Style::default().fg(Color::Red).add_modifier(Modifier::BOLD)),
                false => cell,
            }
        }));
        match n == selected {
            true => row.style(Style::default().bg(Color::DarkGray)),
            false => row,
        }
    });
    Table::new(body, shown.iter().map(|&i| Constraint::Length(COLUMNS[i].width)))
        .header(header)
        .column_spacing(1)
}

/// A past moment in a record: the heartbeat shown and the ones before it.
pub struct Recorded {
    reader: Reader,
    id: i64,
}

impl Recorded {
    /// The newest heartbeat at or before `at`.
    pub fn open(dir: &Path, at: SystemTime) -> Result<Self> {
        let reader = Reader::open(dir)?;
        let id = reader.id_at(at)?.ok_or_else(|| Error::Record {
            path: dir.to_path_buf(),
            reason: "the record holds no heartbeat".into(),
        })?;
        Ok(Self { reader, id })
    }

    /// Moves by `by` heartbeats, within the record.
    pub fn step(&mut self, by: i64) -> Result<()> {
        if let Some((first, last)) = self.reader.bounds()? {
            self.id = self.id.saturating_add(by).clamp(first, last);
        }
        Ok(())
    }

    /// The heartbeat at the current moment and up to `HISTORY - 1` before it, oldest first.
    pub fn history(&self) -> Result<Vec<Heartbeat>> {
        let mut out = VecDeque::with_capacity(HISTORY);
        self.reader.scan(self.id - HISTORY as i64 + 1, |e| {
            if e.id > self.id {
                return false;
            }
            match serde_json::from_slice(&e.json) {
                Ok(hb) => {
                    if out.len() == HISTORY {
                        out.pop_front();
                    }
                    out.push_back(hb);
                }
                Err(why) => log::warn!("record {}: not a heartbeat ({why}); skipped", e.id),
            }
            true
        })?;
        Ok(out.into())
    }
}

/// `top --record DIR --at TIME`: a past moment; `[`/`]` step one heartbeat, `{`/`}` sixty.
pub fn run_recorded(dir: &Path, at: &str) -> Result<()> {
    let at = crate::record::parse_time(at, SystemTime::now())
        .map_err(|reason| Error::Record { path: dir.to_path_buf(), reason })?;
    let mut recorded = Recorded::open(dir, at)?;
    let feed = Feed::Record(dir.display().to_string());
    let mut history = recorded.history()?;
    let mut terminal = ratatui::init();
    let mut view = View::default();
    let result = loop {
        if let Err(e) = terminal.draw(|f| render(f, &history, view, &feed, "")) {
            break Err(Error::io("terminal", e));
        }
        let key = match event::read() {
            Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => k,
            Ok(_) => continue,
            Err(e) => break Err(Error::io("terminal", e)),
        };
        let step = match key.code {
            KeyCode::Char('[') => -1,
            KeyCode::Char(']') => 1,
            KeyCode::Char('{') => -(HISTORY as i64),
            KeyCode::Char('}') => HISTORY as i64,
            _ if quits(key) || !view.key(key.code) => break Ok(()),
            _ => continue,
        };
        if let Err(e) = recorded.step(step).and_then(|()| recorded.history()).map(|h| history = h) {
            break Err(e);
        }
    };
    ratatui::restore();
    result
}

/// Ctrl-C: the terminal is in raw mode, so it arrives as a key, not as SIGINT.
fn quits(key: event::KeyEvent) -> bool {
    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL)
}

/// The latest heartbeat from the daemon's pull API.
pub fn fetch(client: &reqwest::blocking::Client, url: &str) -> Result<Heartbeat> {
    let err = |e: reqwest::Error| Error::Pull { url: url.to_string(), reason: e.to_string() };
    client.get(url).send().and_then(|r| r.error_for_status()).map_err(err)?.json().map_err(err)
}

/// Runs the live view until the user quits.
pub fn run(slice: Slice, listen: &str, interval: Duration, identity: HiveIdentity) -> Result<()> {
    let url = format!("http://{listen}/v1/heartbeat");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .map_err(|e| Error::Pull { url: url.clone(), reason: e.to_string() })?;
    // The daemon's figures when it runs; else this command samples by itself.
    let mut own = match fetch(&client, &url) {
        Ok(_) => None,
        Err(e) => {
            log::info!("{e}; sampling with own probes");
            let options = SamplerOptions { bpf: BpfMode::Preferred, ..Default::default() };
            Some((Sampler::with_options(slice, options)?, monotonic_ns()))
        }
    };
    let feed = if own.is_some() { Feed::Own } else { Feed::Daemon(url.clone()) };

    let mut terminal = ratatui::init();
    let mut view = View::default();
    let mut history: VecDeque<Heartbeat> = VecDeque::with_capacity(HISTORY);
    let mut status = String::from("waiting for the first sample…");
    let mut next = Instant::now();
    let result = loop {
        if Instant::now() >= next {
            next += interval;
            let heartbeat = match &mut own {
                Some((sampler, started)) => sampler
                    .sample()
                    .map(|s| heartbeat::format(&s, &identity, (s.at_ns - *started) / 1_000_000_000)),
                None => fetch(&client, &url),
            };
            match heartbeat {
                Ok(hb) => {
                    if history.len() == HISTORY {
                        history.pop_front();
                    }
                    history.push_back(hb);
                    status.clear();
                }
                Err(e) => status = e.to_string(),
            }
        }
        if let Err(e) = terminal.draw(|f| render(f, history.make_contiguous(), view, &feed, &status)) {
            break Err(Error::io("terminal", e));
        }
        match event::poll(next.saturating_duration_since(Instant::now())) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                    if quits(k) || !view.key(k.code) {
                        break Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => break Err(Error::io("terminal", e)),
            },
            Ok(false) => {}
            Err(e) => break Err(Error::io("terminal", e)),
        }
    };
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;
    use crate::heartbeat::{Collector, Hive, PressureStall, ProbeHealth, SelfCost, Source, WorkerPressure};

    fn worker(group: &str, instance: &str, pid: u32, cpu: Option<f64>, runq: f64) -> Worker {
        Worker {
            pid: Some(pid),
            group: group.into(),
            instance: instance.into(),
            cpu_pct: cpu,
            rss_mb: None,
            gpu_util_pct: None,
            vram_mb: None,
            model: None,
            uptime_s: Some(5),
            io_r_mb_s: None,
            io_w_mb_s: None,
            cgroup: format!("/rbee.slice/{group}/{instance}").into(),
            cgroup_id: 1,
            processes: 1,
            cpu_ns_total: Some(0),
            runq_wait_pct: Some(runq),
            runq_wait_ns_total: Some(0),
            runq_waits_total: Some(0),
            ctx_switches_voluntary_total: Some(0),
            ctx_switches_involuntary_total: Some(0),
            io_syscall_r_mb_s: None,
            io_syscall_w_mb_s: None,
            io_syscall_read_bytes_total: None,
            io_syscall_write_bytes_total: None,
            io_read_bytes_total: None,
            io_write_bytes_total: None,
            processes_forked_total: None,
            execs_total: None,
            processes_exited_total: None,
            memory: None,
            gpus: None,
            pressure: WorkerPressure {
                cpu: Some(stall(Some(runq * 2.0))),
                memory: Some(stall(None)),
                io: None,
            },
        }
    }

    fn stall(some_pct: Option<f64>) -> PressureStall {
        PressureStall { some_ns_total: Some(0), full_ns_total: None, some_pct, full_pct: None }
    }

    fn snapshot() -> Heartbeat {
        let s = Source::Unavailable;
        Heartbeat {
            schema_version: 1,
            seq: 42,
            interval_ms: 1000.0,
            hive: Hive {
                id: "gpu-host-1".into(),
                hostname: "gpu-host-1".into(),
                port: 7835,
                operational_status: "ready".into(),
                health_status: "healthy".into(),
                version: "0.1.0".into(),
                cpu_usage_percent: None,
                ram_used_gb: None,
                ram_total_gb: None,
                vram_per_device: None,
                uptime_seconds: 60,
                model_dir_disk: None,
            },
            timestamp: "2026-11-24T10:00:00Z".into(),
            workers: vec![
                worker("llm", "8080", 101, Some(99.5), 0.2),
                worker("embed", "9090", 202, Some(3.25), 7.5),
                worker("llm", "8081", 303, None, 0.0),
            ],
            prewarm: vec![],
            collector: Collector {
                cpu: Source::Ebpf,
                runq: Source::Ebpf,
                ctx_switches: Source::Ebpf,
                memory: s,
                io_read: s,
                io_write: s,
                io_syscall: s,
                gpu: s,
                model: s,
                host: s,
                processes: s,
                missing: Default::default(),
                programs: Default::default(),
                stream_subscribers: 0,
                probes: ProbeHealth {
                    workers_map_full: 0,
                    read_errors: 0,
                    nested_too_deep: 0,
                    events_lost: 0,
                },
                self_cost: SelfCost { cpu_s: 0.0, kernel_s: 0.0, rss_bytes: 0 },
                record: None,
            },
        }
    }

    fn draw(width: u16, height: u16, view: View) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| render(f, &[snapshot()], view, &Feed::Own, "")).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn rows_in_an_80x24_terminal_busiest_first() {
        let lines = draw(80, 24, View::default());
        assert!(lines[0].contains("gpu-host-1") && lines[0].contains("#42"), "{lines:#?}");
        assert!(lines[1].contains("host CPU n/a%") && lines[1].contains("workers 3"), "{lines:#?}");
        assert!(lines[23].starts_with("sort: CPU% ▼"), "{lines:#?}");
        for title in
            ["WORKER", "PID", "CPU%", "MEM MB", "RD MB/s", "WR MB/s", "GPU%", "VRAM MB", "RUNQ%", "MODEL"]
        {
            assert!(lines[3].contains(title), "{title} missing at 80 columns: {lines:#?}");
        }
        assert!(
            lines[2].starts_with("stall% cpu/mem/io  embed/9090 15/n/a/n/a  llm/8080 0/n/a/n/a"),
            "most stalled first, absent figures n/a: {lines:#?}"
        );
        let rows = &lines[4..7];
        assert!(
            rows[0].starts_with("llm/8080") && rows[0].contains("101") && rows[0].contains("99.5"),
            "{rows:#?}"
        );
        assert!(
            rows[1].starts_with("embed/9090") && rows[1].contains("3.2") && rows[1].contains("7.5"),
            "{rows:#?}"
        );
        assert!(
            rows[2].starts_with("llm/8081") && rows[2].contains("n/a"),
            "missing CPU sorts last: {rows:#?}"
        );
        assert!(lines[23].contains("q quit"), "{lines:#?}");
        assert!(lines.iter().all(|l| l.chars().count() <= 80));
    }

    #[test]
    fn keys_change_the_sort() {
        let mut view = View::default();
        assert!(view.key(KeyCode::Char('1')));
        assert_eq!(view.sort, 0);
        let lines = draw(80, 24, view);
        assert!(lines[23].starts_with("sort: WORKER ▼"), "{lines:#?}");
        assert!(lines[4].starts_with("llm/8081") && lines[6].starts_with("embed/9090"), "{lines:#?}");
        view.key(KeyCode::Char('r'));
        let lines = draw(80, 24, view);
        assert!(lines[23].starts_with("sort: WORKER ▲") && lines[4].starts_with("embed/9090"), "{lines:#?}");
        view.key(KeyCode::Left);
        assert_eq!(view.sort, COLUMNS.len() - 1);
        assert!(!view.key(KeyCode::Char('q')));
    }

    fn screen(terminal: &Terminal<TestBackend>) -> Vec<String> {
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>().trim_end().into()
            })
            .collect()
    }

    #[test]
    fn the_selected_workers_detail_help_and_thresholds() {
        let mut history: Vec<Heartbeat> = (0..70)
            .map(|i| {
                let mut hb = snapshot();
                hb.seq = i;
                hb.workers[1].cpu_pct = Some(i as f64);
                hb
            })
            .collect();
        history.drain(..10);
        let mut view = View::default();
        view.key(KeyCode::Down);
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| render(f, &history, view, &Feed::Own, "")).unwrap();
        let lines = screen(&terminal);
        // The second row by CPU is embed/9090; its pane is below the table.
        let title = lines.iter().position(|l| l.starts_with("embed/9090  pid 202")).expect("detail title");
        assert!(lines[title].contains("last 60 samples"), "{lines:#?}");
        for (row, label) in ["CPU%", "RUNQ%", "RD MB/s", "WR MB/s", "GPU%", "VRAM"].iter().enumerate() {
            assert!(lines[title + 1 + row].starts_with(label), "{label}: {lines:#?}");
        }
        assert!(lines[title + 1].ends_with("69.0%"), "{lines:#?}");
        // A rising CPU: the sparkline's bars grow from left to right.
        let bars: Vec<char> = lines[title + 1].chars().skip(8).take(60).collect();
        assert!(bars[0] != bars[59] && bars[59] == '█', "{bars:?}");
        assert!(lines[title + 3].contains("n/a") && lines.iter().all(|l| l.chars().count() <= 80));
        // RUNQ% 7.5 is not above 10; make it 12.5 and it is drawn in red, in the table and pane.
        let red = |t: &Terminal<TestBackend>, y: usize| {
            let b = t.backend().buffer();
            (0..80).filter(|&x| b[(x, y as u16)].fg == Color::Red).count()
        };
        let row = lines.iter().position(|l| l.starts_with("embed/9090 ")).unwrap();
        assert_eq!(red(&terminal, row), 0);
        history.last_mut().unwrap().workers[1].runq_wait_pct = Some(12.5);
        terminal.draw(|f| render(f, &history, view, &Feed::Own, "")).unwrap();
        assert!(red(&terminal, row) >= 4 && red(&terminal, title + 2) >= 4, "{:#?}", screen(&terminal));
        // ?: the keys.
        view.key(KeyCode::Char('?'));
        terminal.draw(|f| render(f, &history, view, &Feed::Own, "")).unwrap();
        assert!(screen(&terminal).join("\n").contains("one heartbeat back"));
    }

    #[test]
    fn top_at_a_recorded_moment_and_stepping_through_it() {
        let dir = std::env::temp_dir().join(format!("hm-top-at-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut store = crate::record::Store::open(&dir, Default::default()).unwrap();
        for i in 0..100u64 {
            let mut hb = snapshot();
            hb.seq = i + 1;
            hb.timestamp = humantime::format_rfc3339_seconds(t0 + Duration::from_secs(i)).to_string();
            hb.workers[0].cpu_pct = Some(10.0 + i as f64 / 4.0);
            hb.workers[0].runq_wait_pct = Some(if i == 80 { 33.3 } else { 1.0 });
            store.append(&serde_json::to_vec(&hb).unwrap(), t0 + Duration::from_secs(i)).unwrap();
        }
        drop(store);
        let at = crate::record::parse_time("2027-01-15T08:01:20Z", SystemTime::now()).unwrap();
        let offset = at.duration_since(t0).unwrap().as_secs();
        let mut recorded = Recorded::open(&dir, at).unwrap();
        let draw = |recorded: &Recorded| {
            let history = recorded.history().unwrap();
            let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
            let feed = Feed::Record(dir.display().to_string());
            terminal.draw(|f| render(f, &history, View::default(), &feed, "")).unwrap();
            (history.len(), screen(&terminal))
        };
        let (n, lines) = draw(&recorded);
        let expected_seq = offset + 1;
        let cpu = format!("{:.1}", 10.0 + offset as f64 / 4.0);
        assert_eq!(n, 60);
        assert!(lines[0].contains(&format!("#{expected_seq}")) && lines[0].contains("record "), "{lines:#?}");
        assert!(lines[4].starts_with("llm/8080") && lines[4].contains(&cpu), "{lines:#?}");
        // The run-queue spike recorded at that very second.
        assert!(
            lines[4].contains("33.3") && lines.iter().any(|l| l.starts_with("RUNQ%") && l.ends_with("33.3%"))
        );
        assert!(lines.iter().any(|l| l.starts_with("CPU%") && l.ends_with(&format!("{cpu}%"))), "{lines:#?}");
        recorded.step(-1).unwrap();
        let (_, back) = draw(&recorded);
        assert!(back[0].contains(&format!("#{}", expected_seq - 1)), "{back:#?}");
        recorded.step(1000).unwrap();
        let (_, end) = draw(&recorded);
        drop(recorded);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(end[0].contains("#100"), "stepping stops at the newest: {end:#?}");
    }

    /// Serves one canned HTTP answer on a loopback port; returns the URL.
    fn serve_once(status: &'static str, body: String) -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/heartbeat", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(answer.as_bytes());
        });
        url
    }

    #[test]
    fn fetches_the_daemons_heartbeat_and_rejects_garbage() {
        let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
        let url = serve_once("200 OK", serde_json::to_string(&snapshot()).unwrap());
        let hb = fetch(&client, &url).expect("a heartbeat");
        assert_eq!((hb.seq, hb.workers.len(), &*hb.workers[1].instance), (42, 3, "9090"));

        let url = serve_once("200 OK", "{\"not\": \"a heartbeat\"}".into());
        assert!(matches!(fetch(&client, &url), Err(Error::Pull { .. })));
        let url = serve_once("500 Internal Server Error", String::new());
        let e = fetch(&client, &url).unwrap_err().to_string();
        assert!(e.contains("500"), "{e}");
    }

    #[test]
    fn a_narrow_terminal_drops_columns_and_a_tiny_one_says_so() {
        let lines = draw(40, 10, View::default());
        assert!(lines[3].starts_with("WORKER") && lines[3].contains("CPU%"), "{lines:#?}");
        assert!(!lines[3].contains("RUNQ%") && lines.iter().all(|l| l.chars().count() <= 40), "{lines:#?}");
        let tiny = draw(20, 4, View::default());
        assert!(tiny.join(" ").contains("terminal too small"), "{tiny:#?}");
    }
}

//! The heartbeat record (`run --record DIR`): every heartbeat sent, kept as the very JSON
//! that was sent, in a SQLite database (`DIR/heartbeats.sqlite`).
//!
//! SQLite does the storing: each heartbeat is one transaction, so a process killed in the
//! middle of one loses that heartbeat only, and the next open rolls the write-ahead log
//! back to the last commit; a full or read-only disk fails the transaction and leaves the
//! file as it was. Size: a heartbeat is zstd-compressed with the previous one as its
//! dictionary (consecutive heartbeats differ in their figures, not their shape), and every
//! `CHAIN`th is compressed alone so that reading can start there. Retention deletes whole
//! chains, oldest first, and gives the pages back to the file system.
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::{
    error::{Error, Result},
    heartbeat::{Heartbeat, RecordHealth},
};

pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;
/// The file under `--record DIR`.
pub const FILE: &str = "heartbeats.sqlite";
/// Heartbeats per chain: a random read decodes at most this many.
const CHAIN: i64 = 60;
const LEVEL: i32 = 9;
/// The write-ahead log is folded into the database at this size (and truncated to it).
const WAL_BYTES: u64 = 1 << 20;
/// Larger heartbeats are not decoded: no heartbeat is near this, so it is a damaged record.
const MAX_JSON: usize = 256 << 20;
const FORMAT: i64 = 1;

/// How long and how much the record keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub retention: Duration,
    /// Bytes of the database and its write-ahead log together.
    pub max_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { retention: DEFAULT_RETENTION, max_size: DEFAULT_MAX_SIZE }
    }
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Record { path: path.to_path_buf(), reason: e.to_string() }
}

fn millis(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_millis().min(i64::MAX as u128) as i64),
    }
}

/// The write side, owned by one thread.
pub struct Store {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    /// The last record written by this store, and its JSON: the next one's dictionary.
    last: Option<(i64, Vec<u8>)>,
    /// Records in the current chain.
    chained: i64,
}

impl Store {
    /// Opens (or creates) the record under `dir`, creating `dir` if needed.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self> {
        let path = dir.join(FILE);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let conn = Connection::open(&path).map_err(|e| err(&path, e))?;
        // A fresh file only: auto_vacuum is fixed once the first table exists.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL").map_err(|e| err(&path, e))?;
        setup(&conn, &path, true)?;
        let wal_pages = WAL_BYTES.min(limits.max_size / 8) / page_size(&conn, &path)?;
        conn.pragma_update(None, "wal_autocheckpoint", wal_pages.max(1)).map_err(|e| err(&path, e))?;
        conn.pragma_update(None, "journal_size_limit", WAL_BYTES.min(limits.max_size / 8))
            .map_err(|e| err(&path, e))?;
        Ok(Self { conn, path, limits, last: None, chained: 0 })
    }

    /// Appends one heartbeat's JSON recorded at `at` and applies the retention as of `at`;
    /// one transaction, so a failure leaves the record as it was.
    pub fn append(&mut self, json: &[u8], at: SystemTime) -> Result<()> {
        let base = self.last.as_ref().filter(|_| self.chained < CHAIN);
        let data = match base {
            Some((_, dict)) => {
                zstd::bulk::Compressor::with_dictionary(LEVEL, dict).and_then(|mut c| c.compress(json))
            }
            None => zstd::bulk::compress(json, LEVEL),
        }
        .map_err(|e| err(&self.path, e))?;
        let path = &self.path;
        let tx = self.conn.transaction().map_err(|e| err(path, e))?;
        tx.execute(
            "INSERT INTO heartbeat (at_ms, base, len, data) VALUES (?1, ?2, ?3, ?4)",
            params![millis(at), base.map(|b| b.0), json.len() as i64, data],
        )
        .map_err(|e| err(path, e))?;
        let id = tx.last_insert_rowid();
        let deleted = retain(
            &tx,
            millis(at).saturating_sub(self.limits.retention.as_millis().min(i64::MAX as u128) as i64),
            self.limits.max_size,
        )
        .map_err(|e| err(path, e))?;
        tx.commit().map_err(|e| err(path, e))?;
        if deleted {
            // Free pages go back to the file system, so the file itself shrinks.
            self.conn
                .query_row("PRAGMA incremental_vacuum", [], |_| Ok(()))
                .optional()
                .map_err(|e| err(path, e))?;
        }
        self.chained = if base.is_some() { self.chained + 1 } else { 1 };
        self.last = Some((id, json.to_vec()));
        Ok(())
    }

    /// Bytes the record takes on disk: the database and its write-ahead log.
    pub fn disk_bytes(&self) -> u64 {
        disk_bytes(&self.path)
    }
}

pub fn disk_bytes(db: &Path) -> u64 {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    size(db) + size(&PathBuf::from(format!("{}-wal", db.display())))
}

fn page_size(conn: &Connection, path: &Path) -> Result<u64> {
    conn.query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
        .map(|v| v.max(512) as u64)
        .map_err(|e| err(path, e))
}

fn setup(conn: &Connection, path: &Path, write: bool) -> Result<()> {
    conn.busy_timeout(Duration::from_secs(2)).map_err(|e| err(path, e))?;
    let format: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| err(path, e))?;
    if format != 0 && format != FORMAT {
        return Err(err(path, format!("record format {format}; this hive-monitor reads format {FORMAT}")));
    }
    if !write {
        return Ok(());
    }
    // WAL: readers (replay, top --at) never block the writer. NORMAL: a commit survives the
    // process being killed; a power loss may lose the last ones but never corrupts.
    conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| err(path, e))?;
    conn.pragma_update(None, "synchronous", "NORMAL").map_err(|e| err(path, e))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS heartbeat (
            id INTEGER PRIMARY KEY,
            at_ms INTEGER NOT NULL,
            base INTEGER,
            len INTEGER NOT NULL,
            data BLOB NOT NULL
        );
        CREATE INDEX IF NOT EXISTS heartbeat_at ON heartbeat (at_ms);",
    )
    .map_err(|e| err(path, e))?;
    conn.pragma_update(None, "user_version", FORMAT).map_err(|e| err(path, e))
}

/// Deletes the chains that hold only heartbeats older than `cutoff_ms`, then the oldest
/// chains while the database is over `max_size`; never the newest chain. Says whether
/// anything went.
fn retain(tx: &rusqlite::Transaction, cutoff_ms: i64, max_size: u64) -> rusqlite::Result<bool> {
    let mut deleted = false;
    // The chain holding the first heartbeat not older than the cutoff starts what is kept.
    let keep: Option<i64> = tx.query_row(
        "SELECT max(id) FROM heartbeat WHERE base IS NULL AND id <= \
         (SELECT min(id) FROM heartbeat WHERE at_ms >= ?1)",
        [cutoff_ms],
        |r| r.get(0),
    )?;
    if let Some(keep) = keep {
        deleted |= tx.execute("DELETE FROM heartbeat WHERE id < ?1", [keep])? > 0;
    }
    let page: i64 = tx.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let wal = WAL_BYTES.min(max_size / 8);
    loop {
        let pages: i64 = tx.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = tx.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        if ((pages - free) * page) as u64 + wal <= max_size {
            return Ok(deleted);
        }
        let second: Option<i64> = tx.query_row(
            "SELECT min(id) FROM heartbeat WHERE base IS NULL AND id > (SELECT min(id) FROM heartbeat)",
            [],
            |r| r.get(0),
        )?;
        match second {
            Some(second) => deleted |= tx.execute("DELETE FROM heartbeat WHERE id < ?1", [second])? > 0,
            None => return Ok(deleted),
        }
    }
}

/// One recorded heartbeat.
pub struct Entry {
    pub id: i64,
    pub at: SystemTime,
    pub json: Vec<u8>,
}

/// The read side: replay and `top --at`.
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        if !path.exists() {
            return Err(err(&path, "no record here (is this the DIR given to `run --record`?)"));
        }
        // Read-write when allowed, so that a log left by a killed writer is recovered.
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .or_else(|_| Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY))
            .map_err(|e| err(&path, e))?;
        setup(&conn, &path, false)?;
        Ok(Self { conn, path })
    }

    /// The newest record at or before `at` (the oldest record when all are later).
    pub fn id_at(&self, at: SystemTime) -> Result<Option<i64>> {
        let at_or_before: Option<i64> = self
            .conn
            .query_row("SELECT max(id) FROM heartbeat WHERE at_ms <= ?1", [millis(at)], |r| r.get(0))
            .map_err(|e| err(&self.path, e))?;
        Ok(at_or_before.or(self.bounds()?.map(|(first, _)| first)))
    }

    /// The oldest record at or after `at`.
    pub fn id_from(&self, at: SystemTime) -> Result<Option<i64>> {
        self.conn
            .query_row("SELECT min(id) FROM heartbeat WHERE at_ms >= ?1", [millis(at)], |r| r.get(0))
            .map_err(|e| err(&self.path, e))
    }

    /// The ids of the oldest and newest records.
    pub fn bounds(&self) -> Result<Option<(i64, i64)>> {
        self.conn
            .query_row("SELECT min(id), max(id) FROM heartbeat", [], |r| {
                Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
            })
            .map_err(|e| err(&self.path, e))
    }

    /// Calls `each` with every record from id `first` on, in order, until it returns false.
    /// A record whose dictionary is gone or damaged is skipped with a warning.
    pub fn scan(&self, first: i64, mut each: impl FnMut(Entry) -> bool) -> Result<()> {
        let path = &self.path;
        let start: i64 = self
            .conn
            .query_row(
                "SELECT coalesce(max(id), ?1) FROM heartbeat WHERE base IS NULL AND id <= ?1",
                [first],
                |r| r.get(0),
            )
            .map_err(|e| err(path, e))?;
        let mut stmt = self
            .conn
            .prepare("SELECT id, at_ms, base, len, data FROM heartbeat WHERE id >= ?1 ORDER BY id")
            .map_err(|e| err(path, e))?;
        let mut rows = stmt.query([start]).map_err(|e| err(path, e))?;
        let mut last: Option<(i64, Vec<u8>)> = None;
        while let Some(row) = rows.next().map_err(|e| err(path, e))? {
            let (id, at_ms, base, len, data): (i64, i64, Option<i64>, i64, Vec<u8>) = (|| {
                Ok::<_, rusqlite::Error>((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
            })()
            .map_err(|e| err(path, e))?;
            let json = decode(base, len, &data, last.as_ref());
            let json = match json {
                Ok(json) => json,
                Err(why) => {
                    log::warn!("{}: record {id} skipped: {why}", path.display());
                    last = None;
                    continue;
                }
            };
            last = Some((id, json.clone()));
            if id < first {
                continue;
            }
            let at = match at_ms >= 0 {
                true => UNIX_EPOCH + Duration::from_millis(at_ms as u64),
                false => UNIX_EPOCH - Duration::from_millis(at_ms.unsigned_abs()),
            };
            if !each(Entry { id, at, json }) {
                break;
            }
        }
        Ok(())
    }
}

fn decode(
    base: Option<i64>,
    len: i64,
    data: &[u8],
    last: Option<&(i64, Vec<u8>)>,
) -> Result<Vec<u8>, String> {
    let len = usize::try_from(len).ok().filter(|&l| l <= MAX_JSON).ok_or(format!("length {len}"))?;
    let json = match base {
        None => zstd::bulk::decompress(data, len),
        Some(b) => match last {
            Some((id, dict)) if *id == b => {
                zstd::bulk::Decompressor::with_dictionary(dict).and_then(|mut d| d.decompress(data, len))
            }
            _ => return Err(format!("its base record {b} is missing")),
        },
    }
    .map_err(|e| e.to_string())?;
    if json.len() != len {
        return Err(format!("{} bytes decoded, {len} recorded", json.len()));
    }
    Ok(json)
}

/// The daemon's writer: heartbeats are handed to a thread of its own, so a slow, full or
/// read-only disk never holds up sampling or sending. What cannot be recorded is counted
/// (`collector.record.failed`) and logged once until recording works again.
pub struct Recorder {
    tx: Option<mpsc::SyncSender<Arc<Heartbeat>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    written: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

/// Heartbeats waiting for the disk; beyond it they are counted failed.
const QUEUE: usize = 64;

impl Recorder {
    pub fn start(dir: PathBuf, limits: Limits) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Arc<Heartbeat>>(QUEUE);
        let (written, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let counts = (Arc::clone(&written), Arc::clone(&failed));
        let thread = crate::privilege::spawn_unprivileged("record", move || {
            write_loop(&dir, limits, &rx, &counts.0, &counts.1)
        })
        .map_err(|e| Error::io("record thread", e))?;
        Ok(Self { tx: Some(tx), thread: Some(thread), written, failed })
    }

    pub fn health(&self) -> RecordHealth {
        RecordHealth {
            written: self.written.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    pub fn record(&self, heartbeat: &Arc<Heartbeat>) {
        if let Some(tx) = &self.tx {
            if tx.try_send(Arc::clone(heartbeat)).is_err() {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Recorder {
    /// Writes what is queued (the last heartbeat included), then closes the store.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(
    dir: &Path,
    limits: Limits,
    rx: &mpsc::Receiver<Arc<Heartbeat>>,
    written: &AtomicU64,
    failed: &AtomicU64,
) {
    let mut store: Option<Store> = None;
    let mut failing = false;
    let mut json = Vec::new();
    for heartbeat in rx {
        json.clear();
        let result = serde_json::to_writer(&mut json, &*heartbeat).map_err(|e| err(dir, e)).and_then(|()| {
            let at = humantime::parse_rfc3339(&heartbeat.timestamp).unwrap_or_else(|_| SystemTime::now());
            match &mut store {
                Some(s) => s.append(&json, at),
                None => Store::open(dir, limits).and_then(|s| store.insert(s).append(&json, at)),
            }
        });
        match result {
            Ok(()) => {
                written.fetch_add(1, Ordering::Relaxed);
                if std::mem::take(&mut failing) {
                    log::info!("recording to {} again", dir.display());
                }
            }
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                if !std::mem::replace(&mut failing, true) {
                    log::warn!("{e}; heartbeats are still sent but not recorded (counted in collector.record.failed)");
                }
                // Opened again on the next heartbeat: SQLite may leave a connection that
                // hit an I/O error unusable.
                store = None;
            }
        }
    }
}

/// `hive-monitor replay`: the recorded heartbeats between `from` and `to` on standard
/// output, one JSON line each, byte for byte as sent; with `worker` (`group/instance`) only
/// the heartbeats holding it, with only it in `workers`.
pub fn replay(dir: &Path, from: Option<&str>, to: Option<&str>, worker: Option<&str>) -> Result<()> {
    use std::io::Write;
    let now = SystemTime::now();
    let time = |s: Option<&str>| s.map(|s| parse_time(s, now)).transpose().map_err(|e| err(dir, e));
    let (from, to) = (time(from)?, time(to)?);
    let worker = worker
        .map(|w| {
            w.split_once('/').ok_or_else(|| err(dir, format!("--worker {w:?}: expected GROUP/INSTANCE")))
        })
        .transpose()?;
    let reader = Reader::open(dir)?;
    let first = match from {
        Some(t) => reader.id_from(t)?,
        None => reader.bounds()?.map(|(first, _)| first),
    };
    let Some(first) = first else { return Ok(()) };
    let mut out = std::io::stdout().lock();
    let mut failure = None;
    reader.scan(first, |e| {
        if to.is_some_and(|to| e.at > to) {
            return false;
        }
        let line = match worker {
            None => e.json,
            Some((group, instance)) => match serde_json::from_slice::<Heartbeat>(&e.json) {
                Ok(mut hb) => {
                    hb.workers.retain(|w| *w.group == *group && *w.instance == *instance);
                    if hb.workers.is_empty() {
                        return true;
                    }
                    serde_json::to_vec(&hb).expect("a heartbeat serialises")
                }
                Err(why) => {
                    log::warn!("record {}: not a heartbeat ({why}); skipped", e.id);
                    return true;
                }
            },
        };
        match out.write_all(&line).and_then(|()| out.write_all(b"\n")) {
            Ok(()) => true,
            Err(e) => {
                failure = Some(e);
                false
            }
        }
    })?;
    match failure.or_else(|| out.flush().err()) {
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("standard output", e)),
        _ => Ok(()),
    }
}

/// A point in time on the command line: RFC 3339 (`2026-11-24T10:00:00Z`), `now`, or
/// relative to `now` (`10 min ago`, `2h ago`).
pub fn parse_time(s: &str, now: SystemTime) -> std::result::Result<SystemTime, String> {
    let t = s.trim();
    if t == "now" {
        return Ok(now);
    }
    if let Some(ago) = t.strip_suffix("ago") {
        let d = humantime::parse_duration(ago.trim())
            .map_err(|e| format!("`{s}`: {e} (examples: 10 min ago, 2h ago)"))?;
        return now.checked_sub(d).ok_or_else(|| format!("`{s}` is before 1970"));
    }
    humantime::parse_rfc3339_weak(t)
        .map_err(|e| format!("`{s}`: {e} (examples: 2026-11-24T10:00:00Z, 10 min ago)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the temporary directory, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("hm-record-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Heartbeat-like JSON whose figures change from one to the next.
    fn json(n: u64, rng: &mut fastrand::Rng) -> Vec<u8> {
        let workers: Vec<_> = (0..5)
            .map(|w| {
                serde_json::json!({
                    "group": "llm", "instance": format!("{}", 8080 + w),
                    "cpu_pct": rng.f64() * 100.0, "cpu_ns_total": n * 1_000_000_000 + rng.u64(..1_000_000),
                    "rss_mb": rng.u64(100..200),
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({ "seq": n, "workers": workers })).unwrap()
    }

    fn everything(dir: &Path) -> Vec<Entry> {
        let reader = Reader::open(dir).unwrap();
        let mut all = Vec::new();
        if let Some((first, _)) = reader.bounds().unwrap() {
            reader
                .scan(first, |e| {
                    all.push(e);
                    true
                })
                .unwrap();
        }
        all
    }

    #[test]
    fn what_is_appended_reads_back_byte_for_byte_across_reopens() {
        let tmp = TempDir::new("reopen");
        let mut rng = fastrand::Rng::with_seed(1);
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sent: Vec<Vec<u8>> = (1..=150).map(|n| json(n, &mut rng)).collect();
        for (i, chunk) in sent.chunks(70).enumerate() {
            let mut store = Store::open(&tmp.0, Limits::default()).unwrap();
            for (j, j_json) in chunk.iter().enumerate() {
                store.append(j_json, t0 + Duration::from_secs((i * 70 + j) as u64)).unwrap();
            }
        }
        let read = everything(&tmp.0);
        assert_eq!(read.len(), sent.len());
        assert!(read.iter().zip(&sent).all(|(e, s)| &e.json == s));
        assert_eq!(read[100].at, t0 + Duration::from_secs(100));
        // From the middle of a chain, too.
        let reader = Reader::open(&tmp.0).unwrap();
        let id = reader.id_at(t0 + Duration::from_millis(99_500)).unwrap().unwrap();
        let mut from_middle = Vec::new();
        reader
            .scan(id, |e| {
                from_middle.push(e.json);
                from_middle.len() < 3
            })
            .unwrap();
        assert_eq!(from_middle, sent[99..102]);
    }

    #[test]
    fn age_retention_drops_whole_chains_older_than_the_retention() {
        let tmp = TempDir::new("age");
        let mut rng = fastrand::Rng::with_seed(2);
        let limits = Limits { retention: Duration::from_secs(3600), max_size: DEFAULT_MAX_SIZE };
        let mut store = Store::open(&tmp.0, limits).unwrap();
        // The test's clock: one heartbeat every 10 s for 3 hours.
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |i: u64| t0 + Duration::from_secs(10 * i);
        let sent: Vec<Vec<u8>> = (0..1080).map(|n| json(n, &mut rng)).collect();
        for (i, s) in sent.iter().enumerate() {
            store.append(s, at(i as u64)).unwrap();
        }
        let now = at(sent.len() as u64 - 1);
        let cutoff = now - limits.retention;
        let kept = everything(&tmp.0);
        // Everything within the retention is there; older ones only in the chain that
        // reaches into it.
        let within = sent.iter().enumerate().filter(|(i, _)| at(*i as u64) >= cutoff).count();
        assert!(
            kept.len() >= within && kept.len() < within + CHAIN as usize,
            "{} kept, {within} within",
            kept.len()
        );
        assert!(kept[0].at > cutoff - Duration::from_secs(10 * CHAIN as u64), "{:?}", kept[0].at);
        let first = sent.len() - kept.len();
        assert!(kept.iter().zip(&sent[first..]).all(|(e, s)| &e.json == s));
        // An hour later with nothing recorded in between, one heartbeat leaves one chain.
        store.append(&sent[0], now + Duration::from_secs(7200)).unwrap();
        assert_eq!(everything(&tmp.0).len(), 1);
    }

    #[test]
    fn size_retention_keeps_the_file_under_the_limit() {
        let tmp = TempDir::new("size");
        let mut rng = fastrand::Rng::with_seed(3);
        let max_size = 96 << 10;
        let mut store = Store::open(&tmp.0, Limits { retention: DEFAULT_RETENTION, max_size }).unwrap();
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sent: Vec<Vec<u8>> = (0..3000).map(|n| json(n, &mut rng)).collect();
        let mut largest = 0;
        for (i, s) in sent.iter().enumerate() {
            store.append(s, t0 + Duration::from_secs(i as u64)).unwrap();
            largest = largest.max(std::fs::metadata(tmp.0.join(FILE)).unwrap().len());
        }
        assert!(largest <= max_size, "database grew to {largest} bytes, limit {max_size}");
        assert!(store.disk_bytes() <= max_size + WAL_BYTES.min(max_size / 8) * 2, "{}", store.disk_bytes());
        let kept = everything(&tmp.0);
        assert!(kept.len() > CHAIN as usize && kept.len() < sent.len() / 2, "{} kept", kept.len());
        let first = sent.len() - kept.len();
        assert!(kept.iter().zip(&sent[first..]).all(|(e, s)| &e.json == s), "the newest are kept, intact");
    }

    #[test]
    fn times_on_the_command_line() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(parse_time("10 min ago", now), Ok(now - Duration::from_secs(600)));
        assert_eq!(parse_time("2h ago", now), Ok(now - Duration::from_secs(7200)));
        assert_eq!(parse_time("now", now), Ok(now));
        // 2027-01-15 is 20 833 days after 1970-01-01.
        assert_eq!(
            parse_time("2027-01-15T08:00:00Z", now),
            Ok(UNIX_EPOCH + Duration::from_secs(20_833 * 86400 + 8 * 3600))
        );
        for bad in ["yesterday", "10 parsecs ago", "2027-13-01T00:00:00Z", ""] {
            assert!(parse_time(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_directory_without_a_record_is_a_clear_error() {
        let tmp = TempDir::new("none");
        std::fs::create_dir_all(&tmp.0).unwrap();
        let e = Reader::open(&tmp.0).err().unwrap().to_string();
        assert!(e.contains("no record here"), "{e}");
    }
}

//! `run --record DIR` and `replay`: what was sent comes back byte for byte after the daemon
//! is killed, and a full disk stops the recording, never the heartbeats.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use hive_monitor_tests::*;
use serde_json::Value;

const HM_LOAD: &str = env!("CARGO_BIN_EXE_hm-load");
const DAEMON: &str = env!("CARGO_BIN_EXE_hm-daemon");

/// A directory of this test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hm-record-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The daemon watching `slice` every 100 ms, recording to `record`, heartbeats to `out`.
fn daemon(cg: &TestCgroup, record: &Path, out: &Path, err: &Path) -> Child {
    Command::new(DAEMON)
        .args(["run", "--cgroup-root", cg.root.to_str().unwrap(), "--slice", &cg.rel("rbee.slice")])
        .args(["--interval", "100ms", "--listen", "127.0.0.1:0", "--record", record.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(std::fs::File::create(err).unwrap())
        .spawn()
        .expect("start the daemon")
}

/// Whole lines written so far.
fn lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete.lines().map(str::to_owned).collect()
}

fn replay(record: &Path, extra: &[&str]) -> Vec<String> {
    let out = Command::new(DAEMON)
        .args(["replay", "--record", record.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success(), "replay: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
}

fn seq(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["seq"].as_u64().unwrap()
}

#[test]
fn killed_with_sigkill_the_record_replays_what_was_sent() {
    if !bpf_available("record_kill9") {
        return;
    }
    let cg = TestCgroup::new("record");
    let worker = cg.mkdir("rbee.slice/llm/8080");
    let _load = Workload::start(HM_LOAD, &worker, &["busy", "1", "600"]);
    let scratch = Scratch::new("kill9");
    let (record, out, err) = (scratch.0.join("rec"), scratch.0.join("sent"), scratch.0.join("err"));
    let mut child = daemon(&cg, &record, &out, &err);
    wait_for(|| lines(&out).len() >= 30, Duration::from_secs(60), "30 heartbeats sent");
    // Once the record has caught up, so that the kill lands at any point of a heartbeat.
    wait_for(|| replay(&record, &[]).len() >= 30, Duration::from_secs(60), "30 heartbeats recorded");
    child.kill().unwrap();
    child.wait().unwrap();

    let sent = lines(&out);
    let replayed = replay(&record, &[]);
    eprintln!("sent {}, replayed {}", sent.len(), replayed.len());
    // At most the heartbeat being written when the kill came is missing, and only the last.
    assert!(
        replayed.len() == sent.len() || replayed.len() + 1 == sent.len(),
        "{} of {}",
        replayed.len(),
        sent.len()
    );
    assert!(replayed.iter().zip(&sent).all(|(r, s)| r == s), "replayed JSON differs from what was sent");
    let seqs: Vec<u64> = replayed.iter().map(|l| seq(l)).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs[0] == 1, "{seqs:?}");
    let last: Value = serde_json::from_str(&sent[sent.len() - 1]).unwrap();
    assert!(last["workers"].as_array().unwrap().iter().any(|w| w["instance"] == "8080"), "{last}");
    assert!(last["collector"]["record"]["written"].as_u64().unwrap() >= 29, "{}", last["collector"]);
    assert_eq!(last["collector"]["record"]["failed"], 0);

    // The store opens cleanly: a daemon started on it again appends after what is there.
    let out2 = scratch.0.join("sent2");
    let mut again = daemon(&cg, &record, &out2, &err);
    let n = replayed.len() + 3;
    wait_for(
        || replay(&record, &[]).len() >= n,
        Duration::from_secs(60),
        "heartbeats recorded after the restart",
    );
    let _ = again.kill();
    let _ = again.wait();
    let after = replay(&record, &[]);
    assert_eq!(after[..replayed.len()], replayed[..]);
    assert_eq!(after[replayed.len()..replayed.len() + 3], lines(&out2)[..3]);

    // --worker keeps that worker only; --from after the last heartbeat gives nothing.
    let only = replay(&record, &["--worker", "llm/8080", "--to", "now"]);
    assert_eq!(only.len(), after.iter().filter(|l| l.contains("\"instance\":\"8080\"")).count());
    assert!(only.iter().all(|l| serde_json::from_str::<Value>(l).unwrap()["workers"]
        .as_array()
        .unwrap()
        .len()
        == 1));
    assert!(replay(&record, &["--from", "2099-01-01T00:00:00Z"]).is_empty());
}

/// A tmpfs mounted on a directory of this test's own, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status();
        assert!(status.is_ok_and(|s| s.success()), "mount a tmpfs on {}", dir.display());
        Self(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("--lazy").arg(&self.0).status();
    }
}

fn latest(out: &Path) -> Value {
    serde_json::from_str(lines(out).last().expect("a heartbeat")).unwrap()
}

#[test]
fn a_full_disk_stops_the_record_not_the_heartbeats() {
    if !bpf_available("record_full_disk") {
        return;
    }
    let cg = TestCgroup::new("recfull");
    let worker = cg.mkdir("rbee.slice/llm/8080");
    let _load = Workload::start(HM_LOAD, &worker, &["sleep", "600"]);
    let scratch = Scratch::new("full");
    let disk = Tmpfs::mount(scratch.0.join("disk"), "2m");
    let (record, out, err) = (disk.0.join("rec"), scratch.0.join("sent"), scratch.0.join("err"));
    let mut child = daemon(&cg, &record, &out, &err);
    let record_field = |what: &str| latest(&out)["collector"]["record"][what].as_u64().unwrap();
    wait_for(|| lines(&out).len() >= 5 && record_field("written") >= 3, Duration::from_secs(60), "recording");

    // Fill the file system to the last byte.
    let filler = disk.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
    }
    wait_for(|| record_field("failed") >= 5, Duration::from_secs(60), "failed records counted");
    let before = lines(&out).len();
    wait_for(
        || lines(&out).len() >= before + 10,
        Duration::from_secs(60),
        "heartbeats while the disk is full",
    );

    // Room again: recording resumes.
    std::fs::remove_file(&filler).unwrap();
    let written = record_field("written");
    wait_for(|| record_field("written") >= written + 5, Duration::from_secs(60), "recording again");
    let _ = child.kill();
    let _ = child.wait();

    let sent = lines(&out);
    let seqs: Vec<u64> = sent.iter().map(|l| seq(l)).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "a heartbeat was not sent: {seqs:?}");
    let log = std::fs::read_to_string(&err).unwrap();
    assert_eq!(log.matches("not recorded").count(), 1, "the full disk is logged once: {log}");
    // What was recorded is what was sent, with the full disk's heartbeats missing.
    let replayed = replay(&record, &[]);
    let last = latest(&out);
    assert!(replayed.len() as u64 >= last["collector"]["record"]["written"].as_u64().unwrap());
    assert!(replayed.iter().all(|r| sent.contains(r)), "a replayed heartbeat was never sent");
    assert!(replayed.len() < sent.len(), "{} replayed of {} sent", replayed.len(), sent.len());
}

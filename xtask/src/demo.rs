//! `cargo xtask demo`: three workers a newcomer can tell apart, started through
//! `hive-monitor spawn` (a busy "llm/8080" serving a named model, one writing files in
//! bursts, an idle one), the daemon, and `top` on its pull API. On exit, on Ctrl-C and on
//! failure, every process it started is stopped and every cgroup removed.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

pub struct Opts {
    pub daemon: PathBuf,
    /// Without `top`: the daemon's heartbeats on standard output for this long.
    pub seconds: Option<u64>,
    pub slice: String,
    pub cgroup_root: Option<PathBuf>,
    pub listen: String,
}

/// (group, instance, command): what each demo worker runs.
fn workers(scratch: &Path) -> [(&'static str, &'static str, Vec<String>); 3] {
    let sh = |script: &str, args: &[&str]| {
        ["sh", "-c", script].iter().chain(args).map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let file = scratch.join("burst").to_string_lossy().into_owned();
    [
        // A spinning shell whose command line names the model, as an inference server's would.
        ("llm", "8080", sh("while :; do :; done", &["llm-server", "--model", "llama-3.1-8b-instruct"])),
        // 16 MB written and synced every 2 s.
        (
            "io",
            "burst",
            sh(
                "while :; do yes | head -c 16000000 > \"$0\"; sync \"$0\"; rm -f \"$0\"; sleep 2; done",
                &[&file],
            ),
        ),
        ("idle", "1", sh("exec sleep 1000000", &[])),
    ]
}

/// Stops the processes and checks the cgroups are gone, whatever happened before.
struct Demo {
    children: Vec<(String, Child)>,
    cgroups: Vec<PathBuf>,
    scratch: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // The workers first (`spawn` passes SIGTERM on and removes their cgroups), then the
        // daemon and top.
        for (_, child) in self.children.iter_mut().rev() {
            // SAFETY: a plain system call on a process this demo started and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, child) in &mut self.children {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if child.try_wait().ok().flatten().is_none() {
                eprintln!("demo: {name} did not stop on SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        for cgroup in &self.cgroups {
            // Left behind only when a spawn was killed: empty it and remove it.
            if cgroup.exists() {
                let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(100));
                match std::fs::remove_dir(cgroup) {
                    Ok(()) => eprintln!("demo: removed {}", cgroup.display()),
                    Err(e) => eprintln!("demo: could not remove {}: {e}", cgroup.display()),
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

pub fn demo(opts: Opts) -> Result<()> {
    let root = match &opts.cgroup_root {
        Some(root) => root.clone(),
        None if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() => {
            "/sys/fs/cgroup/unified".into()
        }
        None => "/sys/fs/cgroup".into(),
    };
    let mut cgroup_args = vec!["--slice".to_string(), opts.slice.clone()];
    if let Some(root) = &opts.cgroup_root {
        cgroup_args.extend(["--cgroup-root".to_string(), root.to_string_lossy().into_owned()]);
    }
    // Ctrl-C reaches every process in the terminal's foreground group: the workers and the
    // daemon sit in groups of their own, so that this process stops them in order.
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&interrupted))?;
    }
    let scratch = std::env::temp_dir().join(format!("hm-demo-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let mut demo = Demo { children: Vec::new(), cgroups: Vec::new(), scratch: scratch.clone() };
    let start = |cmd: &mut Command, name: String, demo: &mut Demo| -> Result<()> {
        use std::os::unix::process::CommandExt;
        let child = cmd.process_group(0).spawn().with_context(|| format!("starting {name}"))?;
        demo.children.push((name, child));
        Ok(())
    };
    for (group, instance, command) in workers(&scratch) {
        let cgroup = root.join(&opts.slice).join(group).join(instance);
        if cgroup.exists() {
            bail!("{} exists already: is another demo running?", cgroup.display());
        }
        demo.cgroups.push(cgroup);
        let mut cmd = Command::new(&opts.daemon);
        cmd.arg("spawn")
            .args(&cgroup_args)
            .args(["--group", group, "--instance", instance, "--"])
            .args(command);
        start(cmd.stdin(Stdio::null()), format!("worker {group}/{instance}"), &mut demo)?;
    }
    let mut daemon = Command::new(&opts.daemon);
    daemon.arg("run").args(&cgroup_args).args(["--listen", &opts.listen]).stdin(Stdio::null());
    if opts.seconds.is_none() {
        daemon.stdout(Stdio::null());
    }
    start(&mut daemon, "the daemon".into(), &mut demo)?;
    let exited = |demo: &mut Demo| {
        demo.children
            .iter_mut()
            .find_map(|(name, c)| c.try_wait().ok().flatten().map(|s| format!("{name} exited: {s}")))
    };
    match opts.seconds {
        Some(seconds) => {
            let end = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < end && !interrupted.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(why) = exited(&mut demo) {
                    bail!("{why}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        None => {
            eprintln!("demo: workers llm/8080 (busy), io/burst (writes in bursts), idle/1; top opens in 2 s");
            std::thread::sleep(Duration::from_secs(2));
            if let Some(why) = exited(&mut demo) {
                bail!("{why}");
            }
            let status = Command::new(&opts.daemon)
                .arg("top")
                .args(&cgroup_args)
                .args(["--listen", &opts.listen])
                .status()
                .context("starting top")?;
            if !status.success() {
                eprintln!("demo: top exited: {status}");
            }
        }
    }
    drop(demo);
    let left: Vec<String> = workers(&scratch)
        .iter()
        .map(|(g, i, _)| root.join(&opts.slice).join(g).join(i))
        .filter(|c| c.exists())
        .map(|c| c.display().to_string())
        .collect();
    if !left.is_empty() {
        bail!("cgroups left behind: {}", left.join(", "));
    }
    eprintln!("demo: stopped; its workers and cgroups are gone");
    Ok(())
}

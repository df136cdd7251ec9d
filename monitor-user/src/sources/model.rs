//! The model a worker serves, from its main process's command line: `--model X`,
//! `--model=X`, `-m X`, or a `*.gguf` / `*.safetensors` path (its file stem).
//!
//! Reading `/proc/<pid>/cmdline` takes the target's mmap lock, which a worker mapping a large
//! model can hold for a long time, so each process's command line is read once, on a thread
//! of its own; the sampler only looks up what that thread has found.
use std::{
    path::Path,
    sync::{mpsc, Arc, Mutex},
};

use rustc_hash::{FxHashMap, FxHashSet};

/// A process, identified across pid reuse by its start time.
pub type ProcessKey = (u32, u64);

pub struct ModelNames {
    found: Arc<Mutex<FxHashMap<ProcessKey, Option<Arc<str>>>>>,
    requests: mpsc::Sender<ProcessKey>,
    asked: FxHashSet<ProcessKey>,
}

impl ModelNames {
    pub fn new() -> Self {
        let found = Arc::new(Mutex::new(FxHashMap::default()));
        let (requests, rx) = mpsc::channel::<ProcessKey>();
        let results = Arc::clone(&found);
        crate::privilege::spawn_unprivileged("model-names", move || {
            for key in rx {
                let model = read_cmdline(key.0).and_then(|args| model_from_args(&args));
                results.lock().unwrap_or_else(|e| e.into_inner()).insert(key, model.map(Arc::from));
            }
        })
        .expect("spawn the model-name thread");
        Self { found, requests, asked: FxHashSet::default() }
    }

    /// The model of `process` if its command line has been read; asks for it otherwise.
    /// `None` until then, and for a command line that names no model.
    pub fn get(&mut self, process: ProcessKey) -> Option<Arc<str>> {
        if self.asked.insert(process) {
            let _ = self.requests.send(process);
            return None;
        }
        self.found.lock().unwrap_or_else(|e| e.into_inner()).get(&process).cloned().flatten()
    }

    /// Forgets what process `pid` was running: it ran a new program, whose command line is
    /// read afresh at the next `get`.
    pub fn forget_pid(&mut self, pid: u32) {
        self.retain(|k| k.0 != pid);
    }

    /// Drops what is known about processes not in `live`.
    pub fn retain(&mut self, live: impl Fn(&ProcessKey) -> bool) {
        self.asked.retain(|k| live(k));
        self.found.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| live(k));
    }
}

impl Default for ModelNames {
    fn default() -> Self {
        Self::new()
    }
}

fn read_cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The model named by a command line, flags before paths.
pub fn model_from_args(args: &[String]) -> Option<String> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        if let Some(v) = arg.strip_prefix("--model=") {
            return name(v);
        }
        if arg == "--model" || arg == "-m" {
            return iter.next().and_then(|v| name(v));
        }
    }
    args.iter().skip(1).find(|a| a.ends_with(".gguf") || a.ends_with(".safetensors")).and_then(|a| stem(a))
}

/// A flag's value: a model file names its stem, anything else names itself.
fn name(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    if v.ends_with(".gguf") || v.ends_with(".safetensors") {
        return stem(v);
    }
    Some(v.to_string())
}

fn stem(path: &str) -> Option<String> {
    Path::new(path).file_stem().map(|s| s.to_string_lossy().into_owned()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(cmd: &str) -> Option<String> {
        model_from_args(&cmd.split(' ').map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn model_from_command_lines() {
        assert_eq!(model("llm-worker --port 8080 --model llama-3.2-1b").as_deref(), Some("llama-3.2-1b"));
        assert_eq!(model("llm-worker --model=qwen2-7b --port 1").as_deref(), Some("qwen2-7b"));
        assert_eq!(model("server -m /models/mistral-7b.Q4_K_M.gguf").as_deref(), Some("mistral-7b.Q4_K_M"));
        assert_eq!(model("python serve.py /data/phi-3.safetensors").as_deref(), Some("phi-3"));
        assert_eq!(model("server --model=/m/a.gguf /m/b.gguf").as_deref(), Some("a"), "the flag wins");
        assert_eq!(model("server --port 8080"), None);
        assert_eq!(model("server --model"), None, "a flag without a value names nothing");
        assert_eq!(model("/usr/bin/model.gguf"), None, "the program itself is not an argument");
    }

    #[test]
    fn reads_once_off_thread() {
        let mut names = ModelNames::new();
        let me = (std::process::id(), 0);
        assert_eq!(names.get(me), None, "the first ask only queues the read");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !names.found.lock().unwrap().contains_key(&me) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(names.get(me), None, "a test binary's command line names no model");
        names.retain(|_| false);
        assert!(names.asked.is_empty() && names.found.lock().unwrap().is_empty());
    }
}

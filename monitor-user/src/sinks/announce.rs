//! Stream mode: the daemon tells an rbee queen where its heartbeat stream is
//! (`POST {queen}/v1/hive/ready`), and the queen subscribes to it.
//!
//! The queen opens one more subscription for every `ready` it receives, and keeps each open
//! for good, reconnecting 5 s after it drops. So the daemon announces itself only when no
//! one has been subscribed for longer than that (a queen that restarted and forgot it), and
//! never while someone is. At start it first waits the same time for a queen that already
//! knows it.
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use monitor_wire::rbee::Ready;

use crate::error::{Error, Result};

/// How long the queen waits before it subscribes again after a stream closes.
pub const QUEEN_RECONNECT: Duration = Duration::from_secs(5);
/// Beyond the queen's period: its reconnect must have had time to arrive.
const MARGIN: Duration = Duration::from_secs(1);
/// Between attempts while the queen fails or does not subscribe: doubling up to the cap,
/// with up to half again as jitter so a fleet of hives does not call in step.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(8);
/// How often the subscriber count is looked at.
const POLL: Duration = Duration::from_millis(200);

pub struct Announcer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Announcer {
    /// Announces `ready` to the queen at `base` whenever `subscribers` has stayed at 0 for
    /// longer than the queen's reconnect period.
    pub fn start(base: &str, ready: Ready, subscribers: Arc<AtomicUsize>, timeout: Duration) -> Result<Self> {
        let url = format!("{}/v1/hive/ready", base.trim_end_matches('/'));
        let err = |reason: String| Error::Coordinator { url: url.clone(), reason };
        let parsed = reqwest::Url::parse(&url).map_err(|e| err(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(err("only http:// and https:// are supported".into()));
        }
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("hive-monitor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| err(e.to_string()))?;
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let stop = Arc::clone(&stop);
            crate::privilege::spawn_unprivileged("announce", move || {
                announce(&client, &url, &ready, &subscribers, &stop)
            })
            .map_err(|e| Error::io("announce thread", e))?
        };
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn announce(
    client: &reqwest::blocking::Client,
    url: &str,
    ready: &Ready,
    subscribers: &AtomicUsize,
    stop: &(Mutex<bool>, Condvar),
) {
    let mut last_subscribed = Instant::now();
    let mut next_call = Instant::now() + QUEEN_RECONNECT + MARGIN;
    let mut backoff = BACKOFF_FIRST;
    let mut subscribed = false;
    loop {
        {
            let stopped = stop.0.lock().unwrap_or_else(|e| e.into_inner());
            let (stopped, _) = stop.1.wait_timeout(stopped, POLL).unwrap_or_else(|e| e.into_inner());
            if *stopped {
                return;
            }
        }
        let now = Instant::now();
        if subscribers.load(Ordering::Relaxed) > 0 {
            if !subscribed {
                log::info!("coordinator subscribed to the heartbeat stream");
                subscribed = true;
            }
            last_subscribed = now;
            backoff = BACKOFF_FIRST;
            continue;
        }
        if subscribed {
            log::info!("coordinator's subscription closed; announcing again if it is not back in {QUEEN_RECONNECT:?}");
            subscribed = false;
            next_call = now + QUEEN_RECONNECT + MARGIN;
        }
        if now.duration_since(last_subscribed) <= QUEEN_RECONNECT || now < next_call {
            continue;
        }
        let wait = match client.post(url).json(ready).send().and_then(|r| r.error_for_status()) {
            Ok(_) => {
                log::info!("announced {} at {} to {url}", ready.hive_id, ready.hive_url);
                // Time for the queen to subscribe before asking again.
                (QUEEN_RECONNECT + MARGIN).max(backoff)
            }
            Err(e) => {
                log::warn!("announcing to {url}: {e}; again in {backoff:?}");
                backoff
            }
        };
        next_call = Instant::now() + wait.mul_f64(1.0 + fastrand::f64() / 2.0);
        backoff = (backoff * 2).min(BACKOFF_CAP);
    }
}

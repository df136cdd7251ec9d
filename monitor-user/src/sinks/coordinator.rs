//! `POST {coordinator}/v1/hive-heartbeat` on a thread of its own, so a coordinator that is
//! down, slow or broken never holds up sampling. One heartbeat waits at most: a newer one
//! replaces it, so memory stays bounded however long the coordinator is away.
use std::{
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use monitor_wire::ack::Ack;

use crate::{
    error::{Error, Result},
    heartbeat::Heartbeat,
};

/// Retry delays: doubling from the first to the cap, each with up to half again as jitter so
/// a fleet of hives does not retry in step.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Slot {
    /// The newest heartbeat not yet delivered, serialised.
    pending: Option<Vec<u8>>,
    /// The newest acknowledgement not yet taken by the daemon loop.
    ack: Option<Ack>,
    closing: bool,
}

pub struct Coordinator {
    shared: Arc<(Mutex<Slot>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Coordinator {
    /// Starts the sender for `base` (e.g. `http://queen:7833`), with a timeout on every
    /// request and an optional bearer token.
    pub fn start(base: &str, token: Option<String>, timeout: Duration) -> Result<Self> {
        let url = format!("{}/v1/hive-heartbeat", base.trim_end_matches('/'));
        let parsed = reqwest::Url::parse(&url)
            .map_err(|e| Error::Coordinator { url: url.clone(), reason: e.to_string() })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Coordinator { url, reason: "only http:// and https:// are supported".into() });
        }
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("hive-monitor/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Coordinator { url: url.clone(), reason: e.to_string() })?;
        let shared = Arc::new((Mutex::new(Slot::default()), Condvar::new()));
        let thread = {
            let shared = Arc::clone(&shared);
            crate::privilege::spawn_unprivileged("coordinator", move || {
                deliver(&shared, &client, &url, token.as_deref())
            })
            .map_err(|e| Error::io("coordinator thread", e))?
        };
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Hands over a heartbeat; returns at once. A heartbeat still waiting is dropped.
    pub fn send(&self, heartbeat: &Heartbeat) {
        let body = match serde_json::to_vec(heartbeat) {
            Ok(b) => b,
            Err(e) => return log::error!("heartbeat {} not serialisable: {e}", heartbeat.seq),
        };
        let (lock, cv) = &*self.shared;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        if slot.pending.replace(body).is_some() {
            log::debug!("coordinator behind: an undelivered heartbeat was replaced by seq {}", heartbeat.seq);
        }
        cv.notify_one();
    }

    /// The newest acknowledgement since the last call.
    pub fn take_ack(&self) -> Option<Ack> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).ack.take()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).closing = true;
        self.shared.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sender thread: delivers the newest heartbeat, retrying with backoff until it goes
/// through or a newer one replaces it.
fn deliver(
    shared: &(Mutex<Slot>, Condvar),
    client: &reqwest::blocking::Client,
    url: &str,
    token: Option<&str>,
) {
    let (lock, cv) = shared;
    let mut failures = 0u32;
    loop {
        let body = {
            let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
            while slot.pending.is_none() && !slot.closing {
                slot = cv.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
            match slot.pending.take() {
                Some(b) => b,
                None => return, // closing with nothing left to send
            }
        };
        let mut request = client.post(url).header("content-type", "application/json").body(body.clone());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        match request.send().and_then(|r| r.error_for_status()) {
            Ok(reply) => {
                if failures > 0 {
                    log::info!("coordinator {url} reachable again after {failures} failed attempts");
                }
                failures = 0;
                let ack = reply.bytes().ok().and_then(|b| parse_ack(&b));
                if let Some(ack) = ack {
                    lock.lock().unwrap_or_else(|e| e.into_inner()).ack = Some(ack);
                }
            }
            Err(e) => {
                failures += 1;
                // Loud on the first failure, then once per 30 attempts.
                if failures == 1 || failures.is_multiple_of(30) {
                    log::warn!("coordinator {url}: {e} (attempt {failures}; retrying with backoff)");
                }
                let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                // Retry this one unless a newer heartbeat arrived meanwhile.
                slot.pending.get_or_insert(body);
                let delay = backoff(failures);
                let (slot, _) =
                    cv.wait_timeout_while(slot, delay, |s| !s.closing).unwrap_or_else(|e| e.into_inner());
                if slot.closing {
                    return;
                }
            }
        }
    }
}

/// The delay before retry number `failures` (1 = first retry).
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(BACKOFF_CAP);
    base + base.mul_f64(fastrand::f64() * 0.5)
}

/// An acknowledgement, if the body is one; anything else is logged and ignored.
fn parse_ack(body: &[u8]) -> Option<Ack> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    match serde_json::from_slice::<Ack>(body) {
        Ok(ack) => Some(ack),
        Err(e) => {
            log::debug!("coordinator reply is not an acknowledgement ({e}); ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks() {
        let ack = parse_ack(br#"{"server_status":"maintenance","next_interval_ms":2000,"extra":1}"#);
        assert_eq!(
            ack,
            Some(Ack { server_status: Some("maintenance".into()), next_interval_ms: Some(2000) })
        );
        assert_eq!(parse_ack(b"{}"), Some(Ack::default()));
        for garbage in [&b""[..], b"  \n", b"<html>", b"{\"next_interval_ms\": -5}", b"\xff\xfe"] {
            assert_eq!(parse_ack(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        for (n, base) in [(1, 200), (2, 400), (3, 800), (10, 10_000), (1000, 10_000)] {
            let d = backoff(n).as_millis() as u64;
            assert!((base..=base * 3 / 2).contains(&d), "retry {n}: {d} ms");
        }
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in ["not a url", "ftp://queen", "file:///etc/passwd"] {
            assert!(Coordinator::start(url, None, Duration::from_secs(1)).is_err(), "{url}");
        }
    }
}

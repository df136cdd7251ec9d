//! A coordinator's reply to a pushed heartbeat.
use serde::{Deserialize, Serialize};

/// What a 2xx reply may carry. Both fields are optional; a coordinator that sends neither
/// acknowledges as well.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ack {
    /// E.g. `ok`, or `maintenance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_status: Option<String>,
    /// The interval the coordinator asks the hive to send at from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_interval_ms: Option<u64>,
}

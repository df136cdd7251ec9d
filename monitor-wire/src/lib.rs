//! hive-monitor's wire contract, shared by the daemon, the reference coordinator and the fuzz
//! targets: the heartbeat and its JSON Schema, the coordinator's acknowledgement, the worker
//! filters, and the strict worker record today's rbee coordinator parses. Types only, with
//! the conversions between wire records; nothing here measures anything.
pub mod ack;
pub mod filter;
pub mod heartbeat;
pub mod rbee;

//! The shipped Prometheus rules (`deploy/prometheus/`): `promtool check rules` accepts them
//! and `promtool test rules` runs their unit tests (input series, expected alerts and
//! recorded values) without a failure.
use std::{path::PathBuf, process::Command};

use hive_monitor_tests::tool;

fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

fn promtool(test: &str, args: &[&str]) {
    let Some(promtool) = tool(test, "promtool") else { return };
    let out = Command::new(promtool).current_dir(deploy()).args(args).output().expect("run promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("promtool {}:\n{said}", args.join(" "));
    assert!(out.status.success() && said.contains("SUCCESS"), "promtool {}: {said}", args.join(" "));
}

#[test]
fn the_rules_are_valid() {
    promtool("promtool_check_rules", &["check", "rules", "hive-monitor.rules.yml"]);
}

#[test]
fn the_rules_pass_their_unit_tests() {
    promtool("promtool_test_rules", &["test", "rules", "hive-monitor.rules.test.yml"]);
}

//! Device access in a container follows `linux.resources.devices` (a cgroup v2 BPF filter in
//! the guest), as with runc: a device node the spec creates is usable only when a rule allows it.

use std::process::{Output, Stdio};

use brig_e2e::{brig, scratch, serial_port_bundle, text};

/// A bundle whose container gets /dev/ttyS0 (the guest's serial port, c 4:64) as a node,
/// with `rules` (JSON objects) as its device cgroup, running `script`.
fn run_bundle(test: &str, rules: &str, script: &str) -> Output {
    let dir = scratch(test);
    serial_port_bundle(&dir, script, rules);
    brig(test)
        .args(["run", "--rm"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

const SCRIPT: &str = "echo x > /dev/ttyS0 && echo wrote; echo null > /dev/null && echo devnull";

#[test]
fn a_denied_device_cannot_be_opened_and_the_standard_ones_still_can() {
    let out = run_bundle("devdeny", r#"{"allow": false, "access": "rwm"}"#, SCRIPT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "devnull\n");
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_allowed_device_can_be_written() {
    let rules = r#"{"allow": false, "access": "rwm"}, {"allow": true, "type": "c", "major": 4, "minor": 64, "access": "rw"}"#;
    let out = run_bundle("devallow", rules, SCRIPT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "wrote\ndevnull\n");
}

#[test]
fn a_bad_device_rule_is_refused_with_125() {
    let out = run_bundle(
        "devbad",
        r#"{"allow": true, "type": "c", "major": 4, "minor": 64, "access": "rwx"}"#,
        "true",
    );
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("\"rwx\""),
        "{}",
        text(&out.stderr)
    );
}

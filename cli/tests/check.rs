//! `brig check` on the machine running the unit tests: its verdict must match the host.

use std::path::Path;
use std::process::Command;

#[test]
fn check_verdict_matches_this_host() {
    let out = Command::new(env!("CARGO_BIN_EXE_brig"))
        .arg("check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm = Path::new("/dev/kvm").exists();
    let hardware =
        Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
    if pvm {
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("PVM"), "{stdout}");
        assert!(
            stdout.contains("BRIG_KERNEL"),
            "a PVM host is told how to point Brig at a PVM kernel: {stdout}"
        );
    } else if !kvm {
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("no /dev/kvm"), "{stdout}");
    } else if hardware {
        assert_eq!(out.status.code(), Some(0), "{stdout}");
    }
    for fact in ["kvm ", "tun ", "vsock ", "cgroup "] {
        assert!(
            stdout.lines().any(|l| l.starts_with(fact)),
            "no {fact:?} line: {stdout}"
        );
    }
}

#[test]
fn unknown_flags_exit_125_with_the_flag_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_brig"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
}

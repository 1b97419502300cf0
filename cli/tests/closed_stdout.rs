//! A reader that stops early (`brig ps | head -1`) is not an error: brig stops writing and
//! exits as it would have, without a panic message.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let root = std::env::temp_dir().join(format!("brig-closed-stdout-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    for args in [vec!["features"], vec!["ps", "-a"], vec!["check"]] {
        // A pipe whose read end is closed before brig starts: every write gets EPIPE.
        let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = Command::new(env!("CARGO_BIN_EXE_brig"))
            .arg("--root")
            .arg(&root)
            .args(&args)
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(stderr, "", "{args:?}");
        // `check` says 1 on a host that cannot boot guests; either way no 101 (a panic).
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {:?}",
            out.status
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}

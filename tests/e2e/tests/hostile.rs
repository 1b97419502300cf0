//! What a hostile container must not be able to do (issue 8).

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use brig_e2e::{brig, busybox_rootfs};

/// The busybox root filesystem plus `/bin/socket-probe`.
fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("brig-e2e-hostile-{}", std::process::id()));
        let root = busybox_rootfs(&dir);
        std::fs::copy(
            env!("CARGO_BIN_EXE_socket-probe"),
            root.join("bin/socket-probe"),
        )
        .unwrap();
        root
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// AF_VSOCK, AF_UNIX, AF_INET, and an io_uring ring (whose sockets would bypass the
/// AF_VSOCK rule): EPERM, ok, ok, ENOSYS.
const PROBE: &[&str] = &["socket-probe", "40", "1", "2", "io_uring"];
const EXPECTED: &str = "40 errno 1\n1 ok\n2 ok\nio_uring errno 38\n";

fn run(test: &str, flags: &[&str]) -> Output {
    brig(test)
        .args(["run", "--rm"])
        .args(flags)
        .arg(rootfs())
        .args(PROBE)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_container_gets_eperm_for_vsock_sockets_and_keeps_unix_and_inet() {
    let out = run("vsock-plain", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), EXPECTED, "stderr: {}", text(&out.stderr));
}

#[test]
fn vsock_stays_denied_under_an_oci_seccomp_profile() {
    let dir = brig_e2e::scratch("vsock-profile");
    // A profile that allows everything but mkdir: it must not let AF_VSOCK back in, and
    // it still holds.
    let profile = brig_e2e::deny_mkdir_profile(&dir);
    let flag = format!("seccomp={}", profile.display());
    let out = run("vsock-profile", &["--security-opt", &flag]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), EXPECTED, "stderr: {}", text(&out.stderr));
    let out = brig("vsock-profile")
        .args(["run", "--rm", "--security-opt", &flag])
        .arg(rootfs())
        .args(["sh", "-c", "mkdir /tmp/x; echo rc=$?"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "rc=1\n", "stderr: {}", text(&out.stderr));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_exec_gets_eperm_for_vsock_sockets_too() {
    let t = "vsock-exec";
    let out = brig(t)
        .args(["run", "-d", "--name", "target"])
        .arg(rootfs())
        .args(["sleep", "300"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(120);
    let exec = loop {
        let exec = brig(t)
            .arg("exec")
            .arg("target")
            .args(PROBE)
            .output()
            .unwrap();
        if exec.status.success() || Instant::now() > deadline {
            break exec;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = brig(t).args(["rm", "-f", "target"]).output();
    assert!(exec.status.success(), "{}", text(&exec.stderr));
    assert_eq!(
        text(&exec.stdout),
        EXPECTED,
        "stderr: {}",
        text(&exec.stderr)
    );
}

#[test]
fn a_title_setting_sequence_in_an_agent_error_reaches_the_terminal_escaped() {
    // The agent quotes the command it could not find; here the command is an escape sequence
    // that would retitle the user's terminal window.
    let out = brig("escape")
        .args(["run", "--rm"])
        .arg(rootfs())
        .arg("\x1b]0;pwned\x07")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(
        !out.stderr.contains(&0x1b) && !out.stderr.contains(&0x07),
        "raw control bytes reached the terminal: {:?}",
        stderr
    );
    assert!(
        stderr.contains("exec: \"\\u{1b}]0;pwned\\u{7}\": executable file not found"),
        "{stderr}"
    );
}

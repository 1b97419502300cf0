//! Helpers for Brig's end-to-end tests: they run the real binaries and boot real guests
//! (directly on hosts with hardware KVM, inside the nested-KVM lab elsewhere).
//!
//! The binaries and guest images come from the environment the Makefile sets:
//! `BRIG_VMM`, `BRIG_BIN`, `BRIG_KERNEL`, `BRIG_INITRD`.

pub mod containerd;
pub mod cri;
pub mod net;
pub mod podman;
pub mod registry;

use std::path::PathBuf;
use std::process::Command;

use brig_runtime::RuntimeConfig;

/// Bytes as text, lossily.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The stdout of a command that must have succeeded; `what` names it in the panic, which
/// shows its status, stdout and stderr.
pub fn stdout_of(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Minimum, median and maximum of benchmark samples, in milliseconds.
pub fn min_median_max_ms(samples: &mut [std::time::Duration]) -> (f64, f64, f64) {
    samples.sort();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    (
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
    )
}

/// A path from the environment, or a panic that says which variable to set.
pub fn env_path(var: &str) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run the end-to-end tests with `make e2e-test` (a benchmark with its `make bench-…`)")
    });
    assert!(path.exists(), "{var}={} does not exist", path.display());
    path
}

/// Runtime configuration for a test, with its own state root.
pub fn config(test: &str) -> RuntimeConfig {
    let mut config = RuntimeConfig::load().expect("runtime config");
    config.root = PathBuf::from("/run/brig-e2e").join(test);
    config
}

/// `brig-vmm` with the test kernel and initramfs.
pub fn vmm_command() -> Command {
    let mut cmd = Command::new(env_path("BRIG_VMM"));
    cmd.arg("--kernel")
        .arg(env_path("BRIG_KERNEL"))
        .arg("--initrd")
        .arg(env_path("BRIG_INITRD"));
    cmd
}

/// PIDs of running processes whose command name is `name`.
pub fn processes_named(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
                // A zombie that is already reaped disappears; one that is not still counts.
                if comm.trim() == name {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// The VMMs running: brig-vmm processes whose parent is not one. brig-vmm is two processes,
/// a supervisor and, as its child in a PID namespace of its own, the one running the VM;
/// `processes_named("brig-vmm")` finds both (what checks for leftovers want).
pub fn vmm_processes() -> Vec<u32> {
    let all = processes_named("brig-vmm");
    all.iter()
        .copied()
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split(' ').nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            !ppid.is_some_and(|p| all.contains(&p))
        })
        .collect()
}

/// Names of the entries of a directory (empty if it does not exist).
pub fn dir_entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A fresh scratch directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brig-e2e-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A minimal root filesystem: static busybox with its applets, /etc/passwd and group, and
/// the usual empty mount points. Built once per test process under `dir`.
pub fn busybox_rootfs(dir: &std::path::Path) -> PathBuf {
    let root = dir.join("rootfs");
    if root.join("bin/busybox").exists() {
        return root;
    }
    for d in [
        "bin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "data",
        "home/user",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static at /bin/busybox");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nuser:x:1000:\nextra:x:2000:user\n",
    )
    .unwrap();
    root
}

/// A bundle in `dir` (busybox rootfs and config.json) whose container runs `sh -c script`
/// as root and is given the guest's serial port `/dev/ttyS0` (c 4:64) under the device
/// cgroup rules `rules` (OCI `linux.resources.devices` entries, as JSON).
pub fn serial_port_bundle(dir: &std::path::Path, script: &str, rules: &str) {
    busybox_rootfs(dir);
    let config = format!(
        r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "args": ["sh", "-c", {script:?}],
    "cwd": "/",
    "user": {{"uid": 0, "gid": 0}},
    "env": ["PATH=/bin:/sbin:/usr/bin"]
  }},
  "root": {{"path": "rootfs"}},
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}}
  ],
  "linux": {{
    "namespaces": [{{"type": "pid"}}, {{"type": "mount"}}, {{"type": "ipc"}}, {{"type": "uts"}}],
    "devices": [{{"path": "/dev/ttyS0", "type": "c", "major": 4, "minor": 64, "fileMode": 438}}],
    "resources": {{"devices": [{rules}]}}
  }}
}}"#,
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
}

/// `brig` with the test state root.
pub fn brig(test: &str) -> Command {
    let mut cmd = Command::new(env_path("BRIG_BIN"));
    cmd.arg("--root")
        .arg(PathBuf::from("/run/brig-e2e").join(test));
    cmd
}

/// A seccomp profile (OCI `linux.seccomp`) in `dir` that allows everything but `mkdir` and
/// `mkdirat`, which get EPERM. Returns its path.
pub fn deny_mkdir_profile(dir: &std::path::Path) -> PathBuf {
    let profile = dir.join("profile.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
    )
    .unwrap();
    profile
}

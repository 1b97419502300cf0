//! User namespaces: a bundle whose config.json asks for `user` in `linux.namespaces`, with
//! `linux.uidMappings`/`gidMappings`, runs with root of the container mapped to an
//! unprivileged range of the guest, as with runc: root inside, nobody outside.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use brig_e2e::{brig, busybox_rootfs, dir_entries, processes_named, scratch, text};

/// Container IDs 0..65536 are guest IDs 100000..165536.
const MAPPINGS: &str = r#"[{"containerID": 0, "hostID": 100000, "size": 65536}]"#;

/// `/proc/self/uid_map` of such a container, byte for byte (the kernel's `%10u %10u %10u`).
const UID_MAP: &str = "         0     100000      65536\n";

/// A bundle (busybox rootfs, owned by the real root) whose container runs `args` in a new user
/// namespace with `mappings` as its uid and gid mappings, and runc's default mounts.
fn bundle(test: &str, args: &[&str], mappings: &str) -> PathBuf {
    let dir = scratch(test);
    busybox_rootfs(&dir);
    let config = format!(
        r#"{{
  "ociVersion": "1.0.2",
  "process": {{
    "args": {args:?},
    "cwd": "/",
    "user": {{"uid": 0, "gid": 0}},
    "env": ["PATH=/bin:/sbin:/usr/bin", "TERM=xterm"],
    "rlimits": [{{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}}],
    "noNewPrivileges": true
  }},
  "root": {{"path": "rootfs"}},
  "hostname": "userns",
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
      "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}},
    {{"destination": "/dev/pts", "type": "devpts", "source": "devpts",
      "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}},
    {{"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
      "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}},
    {{"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
      "options": ["nosuid", "noexec", "nodev"]}},
    {{"destination": "/sys", "type": "sysfs", "source": "sysfs",
      "options": ["nosuid", "noexec", "nodev", "ro"]}},
    {{"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
      "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}}
  ],
  "linux": {{
    "namespaces": [{{"type": "pid"}}, {{"type": "network"}}, {{"type": "ipc"}},
                   {{"type": "uts"}}, {{"type": "mount"}}, {{"type": "cgroup"}},
                   {{"type": "user"}}],
    "uidMappings": {mappings},
    "gidMappings": {mappings},
    "maskedPaths": ["/proc/kcore", "/sys/firmware"],
    "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
  }}
}}"#
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir
}

fn run(test: &str, flags: &[&str], bundle: &Path) -> Output {
    brig(test)
        .args(["run", "--rm"])
        .args(flags)
        .arg(bundle)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn root_in_a_user_namespace_is_root_only_inside() {
    let t = "userns";
    let dir = bundle(
        t,
        &[
            "sh",
            "-c",
            "id -u; id -g; cat /proc/self/uid_map; stat -c %u /bin/busybox; hostname; \
             head -c 4 /dev/zero | wc -c; touch /root/x && echo WROTE; exit 3",
        ],
        MAPPINGS,
    );
    let out = run(t, &[], &dir);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // Root in the container; the rootfs's real root shows as nobody; the device nodes work.
    assert_eq!(
        text(&out.stdout),
        format!("0\n0\n{UID_MAP}65534\nuserns\n4\n"),
        "{stderr}"
    );
    // Writing into the real root's 0755 directory is refused: it is uid 100000 out there.
    assert!(
        stderr.contains("touch: /root/x: Permission denied"),
        "{stderr}"
    );
    assert!(!dir.join("rootfs/root/x").exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_terminal_works_in_a_user_namespace() {
    let t = "userns-tty";
    let dir = bundle(t, &["sh", "-c", "tty; id -u"], MAPPINGS);
    let out = run(t, &["-t"], &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The terminal turns each "\n" into "\r\n".
    assert_eq!(
        text(&out.stdout),
        "/dev/pts/0\r\n0\r\n",
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exec_joins_the_user_namespace_of_a_detached_container() {
    let t = "userns-exec";
    let dir = bundle(t, &["sleep", "300"], MAPPINGS);
    let out = run(t, &["-d", "--name", "mapped"], &dir);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let exec = brig(t)
        .args([
            "exec",
            "mapped",
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map; exit 5",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(5), "{}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout), format!("0\n{UID_MAP}"));
    let exec = brig(t)
        .args([
            "exec",
            "-t",
            "mapped",
            "sh",
            "-c",
            "tty; touch /root/y || echo refused",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(exec.status.success(), "{}", text(&exec.stderr));
    assert_eq!(
        text(&exec.stdout),
        "/dev/pts/0\r\ntouch: /root/y: Permission denied\r\nrefused\r\n"
    );

    let rm = brig(t).args(["rm", "-f", "mapped"]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(
        processes_named("brig-vmm").is_empty(),
        "brig-vmm left running"
    );
    assert_eq!(
        dir_entries(&Path::new("/run/brig-e2e").join(t).join("containers")),
        Vec::<String>::new()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_user_namespace_without_mappings_is_refused_with_125() {
    let t = "userns-nomap";
    let dir = bundle(t, &["true"], "[]");
    let out = run(t, &[], &dir);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("linux.uidMappings is empty"), "{stderr}");
    assert!(
        processes_named("brig-vmm").is_empty(),
        "brig-vmm left running"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

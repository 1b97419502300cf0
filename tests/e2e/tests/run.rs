//! `brig run`: what a user of `docker run` / `runc run` expects, in a microVM.

use std::io::Write;
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use brig_e2e::{brig, busybox_rootfs, dir_entries, processes_named, text};
use sha2::{Digest, Sha256};

fn rootfs() -> &'static std::path::Path {
    static ROOTFS: OnceLock<std::path::PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("brig-e2e-rootfs-{}", std::process::id()));
        busybox_rootfs(&dir)
    })
}

/// `brig run --rm FLAGS ROOTFS CMD`.
fn run(test: &str, flags: &[&str], cmd: &[&str]) -> Output {
    brig(test)
        .args(["run", "--rm"])
        .args(flags)
        .arg(rootfs())
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_guest_skips_virtio_mmio_interrupt_status_reads_as_brig_vmm_tells_it() {
    // brig-vmm's devices interrupt only for used buffers, so Brig's kernel need not read and
    // acknowledge InterruptStatus (two exits per interrupt): vm.rs MMIO_VRING_IRQ_ONLY and
    // guest-kernel/virtio-mmio-vring-irq-only.patch.
    let out = run(
        "mmio-irq",
        &[],
        &["cat", "/sys/module/virtio_mmio/parameters/vring_irq_only"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "Y");
}

#[test]
fn exit_statuses_propagate_exactly() {
    for (script, want) in [
        ("true", 0),
        ("exit 3", 3),
        ("sleep 30 & kill -KILL $!; wait $!", 137),
        ("sleep 30 & kill -TERM $!; wait $!", 143),
    ] {
        let out = run("exit", &[], &["sh", "-c", script]);
        assert_eq!(
            out.status.code(),
            Some(want),
            "{script}: stderr {}",
            text(&out.stderr)
        );
    }
    for dir in ["containers", "sandboxes", "v"] {
        let left = dir_entries(&std::path::Path::new("/run/brig-e2e/exit").join(dir));
        assert_eq!(left, Vec::<String>::new(), "state left in {dir}");
    }
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let out = run(
        "stdio",
        &[],
        &["sh", "-c", "echo out; echo err >&2; echo out2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\nout2\n");
    assert_eq!(text(&out.stderr), "err\n");
}

#[test]
fn stdin_reaches_the_container_and_its_end_ends_cat() {
    let mut child = brig("stdin")
        .args(["run", "-i"])
        .arg(rootfs())
        .arg("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
}

#[test]
fn env_cwd_user_and_groups_are_honoured() {
    let out = run(
        "identity",
        &["-e", "FOO=bar baz", "-w", "/tmp", "-u", "1000:1000"],
        &["sh", "-c", "echo \"$FOO\"; pwd; id -u; id -g"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "bar baz\n/tmp\n1000\n1000\n");
}

#[test]
fn the_command_is_pid_1_and_sees_only_its_container() {
    let out = run(
        "pidns",
        &[],
        &["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(lines[0], "1");
    let procs: u32 = lines[1].parse().unwrap();
    assert!(procs <= 3, "the container sees {procs} processes");
}

#[test]
fn uname_shows_the_guest_kernel() {
    let out = run("uname", &[], &["uname", "-r"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let guest = text(&out.stdout);
    assert!(guest.starts_with("6.1."), "{guest}");
    assert_ne!(guest.trim(), host.trim());
}

#[test]
fn memory_limit_kills_a_hog_with_137_and_says_why() {
    let out = run(
        "oom",
        &["--memory", "64M"],
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1"],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("memory limit"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    let out = run(
        "pids",
        &["--pids-limit", "8"],
        &[
            "sh",
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & done; wait; echo survived",
        ],
    );
    assert!(
        text(&out.stderr).to_lowercase().contains("fork"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn cpus_limit_lands_in_the_cgroup() {
    let out = run(
        "cpus",
        &["--cpus", "0.5"],
        &["sh", "-c", "cat /sys/fs/cgroup/cpu.max"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "50000 100000");
}

#[test]
fn volumes_read_only_rejects_writes_and_read_write_lands_on_the_host() {
    let dir = brig_e2e::scratch("volumes");
    let ro = dir.join("ro");
    let rw = dir.join("rw");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("given"), b"from host").unwrap();
    let out = run(
        "volumes",
        &[
            "-v",
            &format!("{}:/ro:ro", ro.display()),
            "-v",
            &format!("{}:/rw", rw.display()),
        ],
        &[
            "sh",
            "-c",
            "cat /ro/given; echo written > /rw/new; if echo x > /ro/nope; then echo WROTE; fi",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "from host");
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(rw.join("new")).unwrap(), b"written\n");
    assert!(!ro.join("nope").exists());
    // The rootfs and volumes are unmounted from the sandbox afterwards and intact.
    assert!(std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .all(|l| !l.contains("/run/brig-e2e/volumes")));
    assert_eq!(std::fs::read(ro.join("given")).unwrap(), b"from host");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ten_mebibytes_of_output_arrive_intact() {
    let dir = brig_e2e::scratch("bulk");
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("blob"), &data).unwrap();
    let out = run(
        "bulk",
        &["-v", &format!("{}:/data:ro", dir.display())],
        &["cat", "/data/blob"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&data));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn seccomp_profile_denying_mkdir_gives_eperm() {
    let dir = brig_e2e::scratch("seccomp");
    let profile = brig_e2e::deny_mkdir_profile(&dir);
    let out = run(
        "seccomp",
        &["--security-opt", &format!("seccomp={}", profile.display())],
        &[
            "sh",
            "-c",
            "mkdir /tmp/x; echo rc=$?; touch /tmp/y && echo touched",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "rc=1\ntouched\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("Operation not permitted"),
        "{}",
        text(&out.stderr)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Seconds since midnight of the tracing timestamp (`…T21:33:36.503051Z`) on the first
/// stderr line containing every one of `needles`.
fn log_time(stderr: &str, needles: &[&str]) -> f64 {
    let line = stderr
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no log line with {needles:?} in: {stderr}"));
    let t = line.find('T').map(|i| &line[i + 1..]).unwrap();
    let clock: String = t
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ':' || *c == '.')
        .collect();
    let parts: Vec<f64> = clock.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

#[test]
fn a_missing_command_fails_at_once_with_127() {
    // From the agent being ready to CreateContainer's answer: the command is looked up while
    // the container is created, so a missing one must fail at once (Kata waits 60 s here):
    // within a second, or, when the lab is slow, no later than twice what creating a
    // container that works takes in the same test.
    let create_time = |cmd: &str| {
        let started = Instant::now();
        let out = brig("missing")
            .args(["--log-level", "debug", "run", "--rm"])
            .arg(rootfs())
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        let ready = log_time(&stderr, &["agent answered", "boot_time"]);
        let answered = log_time(&stderr, &["agent answered CreateContainer"]);
        (out, stderr, answered - ready, started.elapsed())
    };
    let (ok, ok_stderr, ok_create, _) = create_time("true");
    assert!(ok.status.success(), "{ok_stderr}");
    let (out, stderr, failed, took) = create_time("no-such-command");
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("exec: \"no-such-command\": executable file not found in $PATH"),
        "{stderr}"
    );
    let bound = (2.0 * ok_create).max(1.0);
    assert!(failed < bound, "the failure came {failed:.3} s after the agent was ready (a working create took {ok_create:.3} s)");
    assert!(
        took < Duration::from_secs(30),
        "the whole failed run took {took:?}"
    );
    let out = run("missing", &[], &["/etc/passwd"]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
}

#[test]
fn a_terminal_is_given_with_t_and_resizes_reach_it() {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    // Run brig on a pseudo-terminal of 33 rows and 101 columns, as a user's terminal.
    let size = nix::pty::Winsize {
        ws_row: 33,
        ws_col: 101,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut child = brig("tty")
        .args(["run", "-t"])
        .arg(rootfs())
        .args(["sh", "-c", "tty; stty size"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(slave);
    let mut master = std::fs::File::from(pty.master);
    let _ = master.as_raw_fd();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once every slave is closed ends the read.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    let out = text(&reader.join().unwrap());
    let lines: Vec<&str> = out
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.is_empty())
        .collect();
    assert!(lines.contains(&"/dev/pts/0"), "{out:?}");
    assert!(
        lines.contains(&"33 101"),
        "window size did not reach the container: {out:?}"
    );
}

#[test]
fn bad_input_gets_one_line_and_125() {
    let dir = brig_e2e::scratch("badinput");
    std::fs::create_dir_all(dir.join("bundle/rootfs")).unwrap();
    std::fs::write(dir.join("bundle/config.json"), b"{ this is not json").unwrap();
    let bundle = dir.join("bundle").display().to_string();
    let rootfs = rootfs().display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "/nonexistent/rootfs", "true"],
            "/nonexistent/rootfs",
        ),
        (vec!["run", &bundle, "true"], "config.json"),
        (vec!["run", "--memory", "0", &rootfs, "true"], "--memory"),
        (
            vec!["run", "--no-such-flag", &rootfs, "true"],
            "--no-such-flag",
        ),
    ];
    for (args, needle) in cases {
        let out = brig("badinput").args(&args).output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            stderr.trim().lines().count() <= 3,
            "{args:?}: not short: {stderr}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
    assert!(processes_named("brig-vmm").is_empty());
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `brig run --name NAME FLAGS ROOTFS CMD` in the background (stdin empty, stdout and stderr
/// piped), returned once `brig ps` shows the container running.
fn start_running(test: &str, name: &str, flags: &[&str], cmd: &[&str]) -> std::process::Child {
    let child = brig(test)
        .args(["run", "--name", name])
        .args(flags)
        .arg(rootfs())
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the container to run", || {
        let ps = brig(test).arg("ps").output().unwrap();
        text(&ps.stdout)
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) && l.contains("running"))
    });
    child
}

fn no_mounts_under(root: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .all(|l| !l.contains(root))
}

#[test]
fn detached_container_keeps_running_and_takes_exec_logs_kill_and_rm() {
    let t = "detached";
    let out = brig(t)
        .args(["run", "-d", "--name", "bg"])
        .arg(rootfs())
        .args(["sh", "-c", "echo started; echo oops >&2; exec sleep 300"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "bg\n");

    let ps = brig(t).arg("ps").output().unwrap();
    assert!(
        text(&ps.stdout)
            .lines()
            .any(|l| l.starts_with("bg ") && l.contains("running")),
        "{}",
        text(&ps.stdout)
    );

    let exec = brig(t)
        .args([
            "exec",
            "bg",
            "sh",
            "-c",
            "echo $$ $(cat /proc/1/comm); exit 5",
        ])
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(5), "{}", text(&exec.stderr));
    let exec_out = text(&exec.stdout);
    let fields: Vec<&str> = exec_out.split_whitespace().collect();
    assert_ne!(fields[0], "1", "exec'd process is not the container's init");
    assert_eq!(fields[1], "sleep", "the container's PID 1 is its command");
    let missing = brig(t)
        .args(["exec", "bg", "no-such-command"])
        .output()
        .unwrap();
    assert_eq!(
        missing.status.code(),
        Some(127),
        "{}",
        text(&missing.stderr)
    );

    wait_for("logs", || {
        let logs = brig(t).args(["logs", "bg"]).output().unwrap();
        text(&logs.stdout) == "started\n" && text(&logs.stderr) == "oops\n"
    });

    let kill = brig(t).args(["kill", "bg"]).output().unwrap();
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    wait_for("exit after kill", || {
        let ps = brig(t).args(["ps", "-a"]).output().unwrap();
        text(&ps.stdout)
            .lines()
            .any(|l| l.starts_with("bg ") && l.contains("exited (137)"))
    });
    wait_for("the VMM to go", || processes_named("brig-vmm").is_empty());
    let rm = brig(t).args(["rm", "bg"]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(no_mounts_under("/run/brig-e2e/detached"));
    assert_eq!(
        dir_entries(std::path::Path::new("/run/brig-e2e/detached/containers")),
        Vec::<String>::new()
    );
    assert_eq!(
        dir_entries(std::path::Path::new("/run/brig-e2e/detached/sandboxes")),
        Vec::<String>::new()
    );
}

#[test]
fn exec_runs_as_the_containers_user_with_its_env_and_workdir_unless_told_otherwise() {
    let t = "exec-inherits";
    let out = brig(t)
        .args([
            "run",
            "-d",
            "--name",
            "inherit",
            "-u",
            "1000:1000",
            "-e",
            "FOO=bar",
            "-w",
            "/tmp",
        ])
        .arg(rootfs())
        .args(["sleep", "300"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let script = "id -u; id -g; echo $FOO; pwd";
    let exec = brig(t)
        .args(["exec", "inherit", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(exec.status.success(), "{}", text(&exec.stderr));
    assert_eq!(
        text(&exec.stdout),
        "1000\n1000\nbar\n/tmp\n",
        "as docker exec: the container's user, env and cwd"
    );
    let exec = brig(t)
        .args([
            "exec", "-u", "0", "-e", "FOO=baz", "-w", "/", "inherit", "sh", "-c", script,
        ])
        .output()
        .unwrap();
    assert!(exec.status.success(), "{}", text(&exec.stderr));
    assert_eq!(
        text(&exec.stdout),
        "0\n0\nbaz\n/\n",
        "flags override what the container has"
    );
    let bad = brig(t)
        .args(["exec", "-w", "relative", "inherit", "true"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(125));
    assert!(
        text(&bad.stderr).contains("absolute"),
        "{}",
        text(&bad.stderr)
    );
    let rm = brig(t).args(["rm", "-f", "inherit"]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(
        processes_named("brig-vmm").is_empty(),
        "brig-vmm left running"
    );
    assert!(
        no_mounts_under("/run/brig-e2e/exec-inherits"),
        "mounts left"
    );
}

#[test]
fn rm_f_of_a_running_container_leaves_no_vmm_mount_or_socket() {
    let t = "rmf";
    let out = brig(t)
        .args(["run", "-d", "--name", "doomed"])
        .arg(rootfs())
        .args(["sleep", "300"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rm = brig(t).args(["rm", "doomed"]).output().unwrap();
    assert_eq!(
        rm.status.code(),
        Some(125),
        "rm without -f refuses a running container"
    );
    assert!(text(&rm.stderr).contains("rm -f"), "{}", text(&rm.stderr));
    let rm = brig(t).args(["rm", "-f", "doomed"]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(
        processes_named("brig-vmm").is_empty(),
        "brig-vmm left running"
    );
    assert!(no_mounts_under("/run/brig-e2e/rmf"), "mounts left");
    assert_eq!(
        dir_entries(std::path::Path::new("/run/brig-e2e/rmf/sandboxes")),
        Vec::<String>::new()
    );
    assert_eq!(
        dir_entries(std::path::Path::new("/run/brig-e2e/rmf/containers")),
        Vec::<String>::new()
    );
}

#[test]
fn ctrl_c_reaches_the_container() {
    let t = "sigint";
    let child = start_running(
        t,
        "interrupted",
        &[],
        &[
            "sh",
            "-c",
            "trap 'echo got INT; exit 7' INT; echo ready; while :; do sleep 1; done",
        ],
    );
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    std::thread::sleep(Duration::from_millis(500)); // let the shell set its trap
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "ready\ngot INT\n");
}

#[test]
fn a_foreground_container_without_rm_is_kept_until_brig_rm() {
    let t = "kept";
    let out = brig(t)
        .args(["run", "--name", "kept"])
        .arg(rootfs())
        .args(["sh", "-c", "echo out; echo err >&2; exit 3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(
        (text(&out.stdout).as_str(), text(&out.stderr).as_str()),
        ("out\n", "err\n")
    );
    assert!(
        processes_named("brig-vmm").is_empty(),
        "the microVM outlived its container"
    );
    assert!(no_mounts_under("/run/brig-e2e/kept"), "mounts left");

    let ps = text(&brig(t).args(["ps", "-a"]).output().unwrap().stdout);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("kept ") && l.contains("exited (3)")),
        "{ps}"
    );
    let ps = text(&brig(t).arg("ps").output().unwrap().stdout);
    assert!(
        !ps.contains("kept"),
        "an exited container is listed as running: {ps}"
    );
    let logs = brig(t).args(["logs", "kept"]).output().unwrap();
    assert_eq!(
        (text(&logs.stdout).as_str(), text(&logs.stderr).as_str()),
        ("out\n", "err\n")
    );

    let again = brig(t)
        .args(["run", "--name", "kept"])
        .arg(rootfs())
        .arg("true")
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(125));
    assert!(
        text(&again.stderr).contains("brig rm kept"),
        "{}",
        text(&again.stderr)
    );

    let rm = brig(t).args(["rm", "kept"]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert_eq!(
        dir_entries(std::path::Path::new("/run/brig-e2e/kept/containers")),
        Vec::<String>::new()
    );
    assert_eq!(
        dir_entries(std::path::Path::new("/run/brig-e2e/kept/sandboxes")),
        Vec::<String>::new()
    );
}

#[test]
fn the_share_cache_mode_is_configurable_and_data_survives_it() {
    let t = "fscache";
    let dir = brig_e2e::scratch(t);
    let script = "dd if=/dev/urandom of=/data/blob bs=64k count=40 2>/dev/null; \
                  cp /data/blob /tmp/copy; sha256sum /data/blob /tmp/copy | cut -d' ' -f1";
    let volume = format!("{}:/data", dir.display());
    for mode in ["metadata", "never", "always", "auto"] {
        let out = brig(t)
            .env("BRIG_FS_CACHE", mode)
            .args(["run", "--rm", "-v", &volume])
            .arg(rootfs())
            .args(["sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {}", text(&out.stderr));
        let digest = Sha256::digest(std::fs::read(dir.join("blob")).unwrap());
        let on_host: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            text(&out.stdout),
            format!("{on_host}\n{on_host}\n"),
            "{mode}: the guest and the host see the same bytes"
        );
    }
    let out = brig(t)
        .env("BRIG_FS_CACHE", "sometimes")
        .args(["run", "--rm"])
        .arg(rootfs())
        .arg("true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("\"sometimes\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_file_the_host_changes_is_read_anew_at_the_next_open_in_the_guest() {
    // Under the default fs_cache (auto) the guest keeps the page cache of a file that did
    // not change between two opens; a change on the host must show at the next open.
    let t = "reopen";
    let dir = brig_e2e::scratch(t);
    let page = dir.join("page");
    std::fs::write(&page, "one\n").unwrap();
    // Older than brig-vmm's two seconds: its cache is kept from the second open on.
    std::thread::sleep(Duration::from_millis(2500));
    let script = "cat /data/page; cat /data/page; cat /data/page; touch /data/read; \
                  while [ ! -e /data/go ]; do sleep 0.1; done; cat /data/page";
    let volume = format!("{}:/data", dir.display());
    let child = brig(t)
        .args(["run", "--rm", "-v", &volume])
        .arg(rootfs())
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("read").exists() {
        assert!(
            Instant::now() < deadline,
            "the container did not read the page"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::write(&page, "two\n").unwrap(); // the same size
    std::fs::write(dir.join("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "one\none\none\ntwo\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_container_can_look_at_more_files_than_the_usual_open_file_limit() {
    // The VMM's file server holds a descriptor per file the guest looked up: 3 000 files is
    // past the usual soft limit of 1 024 (brig-vmm raises it).
    let dir = brig_e2e::scratch("manyfiles");
    for i in 0..3000 {
        std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
    }
    let out = run(
        "manyfiles",
        &["-v", &format!("{}:/data:ro", dir.display())],
        &[
            "sh",
            "-c",
            "ls -l /data | grep -c ' f'; cat /data/* | wc -c",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "3000\n3000\n");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_microvm_that_dies_under_a_container_is_reported_and_cleaned_up() {
    let t = "vmm-died";
    let child = start_running(
        t,
        "doomed",
        &["--rm"],
        &["sh", "-c", "echo ready; exec sleep 300"],
    );
    let vmms = brig_e2e::vmm_processes();
    assert_eq!(vmms.len(), 1, "brig-vmm processes: {vmms:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmms[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(125),
        "stderr: {}",
        text(&out.stderr)
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("microVM stopped unexpectedly") && stderr.contains("SIGKILL"),
        "stderr: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr}");
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    assert!(no_mounts_under("/run/brig-e2e/vmm-died"), "mounts left");
    assert!(
        dir_entries(std::path::Path::new("/run/brig-e2e/vmm-died/sandboxes")).is_empty(),
        "sandbox state left"
    );
}

#[test]
fn a_killed_brig_takes_its_microvm_with_it_and_brig_rm_cleans_up() {
    let t = "owner-killed";
    let mut child = start_running(t, "orphan", &[], &["sleep", "300"]);
    assert_eq!(brig_e2e::vmm_processes().len(), 1);
    // SIGKILL: brig gets no chance to clean up; the kernel must end the VMM for it.
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the orphaned microVM to end", || {
        processes_named("brig-vmm").is_empty()
    });
    let ps = text(&brig(t).args(["ps", "-a"]).output().unwrap().stdout);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("orphan ") && l.contains("exited")),
        "{ps}"
    );
    let rm = brig(t).args(["rm", "orphan"]).output().unwrap();
    assert!(rm.status.success(), "brig rm: {}", text(&rm.stderr));
    assert!(no_mounts_under("/run/brig-e2e/owner-killed"), "mounts left");
    assert!(
        dir_entries(std::path::Path::new("/run/brig-e2e/owner-killed/sandboxes")).is_empty(),
        "sandbox state left"
    );
}

//! containerd 1.6 (Debian's) driving `containerd-shim-brig-v2` through `ctr`, as a user who
//! picks the runtime with `--runtime io.containerd.brig.v2` does. Each test starts its own
//! containerd on a tmpfs root, imports a busybox image built here, and checks what `ctr`
//! shows and what is left on the host afterwards.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use brig_e2e::containerd::{Containerd, IMAGE, RUNTIME};
use brig_e2e::text;

#[test]
fn ctr_run_runs_a_container_in_a_microvm_and_leaves_nothing() {
    let c = Containerd::start("run");
    c.import_busybox();
    let host_kernel = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        IMAGE,
        "run1",
        "sh",
        "-c",
        "echo out; echo err >&2; uname -r; exit 3",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout {stdout}\nstderr {}\ncontainerd: {}",
        text(&out.stderr),
        c.log()
    );
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("out"), "stdout: {stdout}");
    let guest_kernel = lines.next().unwrap_or_default();
    assert!(
        !guest_kernel.is_empty() && guest_kernel != host_kernel.trim(),
        "the container runs on the guest's kernel, not the host's {host_kernel}: {stdout}"
    );
    assert!(
        text(&out.stderr).contains("err"),
        "stderr: {}",
        text(&out.stderr)
    );
    c.assert_clean();
}

#[test]
fn a_detached_task_execs_reports_stats_and_is_killed_and_deleted() {
    let c = Containerd::start("task");
    c.import_busybox();
    let mut events = c
        .ctr_command(&["events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // task1 puts 48 MiB in its /dev/shm (tmpfs: charged to its memory cgroup), then counts,
    // a line each 0.2 s, into a log file on the host.
    let log = c.dir.join("task1.log");
    let log_uri = format!("file://{}", log.display());
    c.ok(&[
        "run",
        "-d",
        "--log-uri",
        &log_uri,
        "--runtime",
        RUNTIME,
        IMAGE,
        "task1",
        "sh",
        "-c",
        "head -c 50331648 /dev/zero > /dev/shm/fill && echo filled; \
         i=0; while true; do i=$((i+1)); echo $i; sleep 0.2; done",
    ]);
    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while lines() < 2 {
        assert!(
            Instant::now() < deadline,
            "task1 did not fill its 48 MiB and count: {:?}",
            std::fs::read_to_string(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let tasks = c.ok(&["task", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("task1") && l.contains("RUNNING")),
        "ctr task ls: {tasks}"
    );
    let exec = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "task1",
        "sh",
        "-c",
        "echo from-exec; exit 5",
    ]);
    assert_eq!(
        exec.status.code(),
        Some(5),
        "exec: {}{}",
        text(&exec.stdout),
        text(&exec.stderr)
    );
    assert_eq!(text(&exec.stdout), "from-exec\n");
    let missing = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "task1",
        "no-such-command",
    ]);
    assert!(
        !missing.status.success(),
        "exec of a missing command must fail"
    );
    assert!(
        text(&missing.stderr).contains("no-such-command"),
        "the error names the command: {}",
        text(&missing.stderr)
    );
    let metrics = c.ok(&["task", "metrics", "task1"]);
    // ctr decodes v2 metrics only from io.containerd.cgroups.v2.Metrics.
    assert!(
        metrics.contains("memory.usage") && metrics.contains("pids.current"),
        "metrics: {metrics}"
    );
    // The memory the guest's cgroup counts: within 20 % of the 48 MiB the task allocated.
    let usage: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("memory.usage "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no memory.usage in {metrics}"));
    let allocated = 48.0 * 1024.0 * 1024.0;
    assert!(
        (usage - allocated).abs() <= 0.2 * allocated,
        "memory.usage {usage} is not within 20 % of the {allocated} bytes task1 allocated: {metrics}"
    );
    let pids = c.ok(&["task", "ps", "task1"]);
    assert!(pids.lines().count() >= 2, "ctr task ps: {pids}");
    c.ok(&["task", "pause", "task1"]);
    let tasks = c.ok(&["task", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("task1") && l.contains("PAUSED")),
        "ctr task ls after pause: {tasks}"
    );
    // A paused task makes no progress (after a second for lines already on their way);
    // once resumed, it counts on.
    std::thread::sleep(Duration::from_secs(1));
    let paused_at = lines();
    std::thread::sleep(Duration::from_secs(2));
    let paused_after = lines();
    c.ok(&["task", "resume", "task1"]);
    std::thread::sleep(Duration::from_secs(2));
    let resumed_after = lines();
    assert_eq!(paused_at, paused_after, "task1 counted while paused");
    assert!(
        resumed_after > paused_after,
        "task1 did not count on after resume ({resumed_after} lines)"
    );
    // (ctr 1.6 has no `task update`: Update has no test through containerd yet.)
    c.ok(&["task", "kill", "-s", "SIGKILL", "task1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tasks = c.ok(&["task", "ls"]);
        if tasks
            .lines()
            .any(|l| l.starts_with("task1") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "task1 never stopped: {tasks}");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.ok(&["task", "rm", "task1"]);
    c.ok(&["containers", "rm", "task1"]);
    // A container that outgrows its memory limit is OOM-killed in the guest: 137, TaskOOM.
    let oom = c.ctr(&[
        "run",
        "--rm",
        "--memory-limit",
        "33554432",
        "--runtime",
        RUNTIME,
        IMAGE,
        "oom1",
        "sh",
        "-c",
        "x=aaaaaaaa; while :; do x=$x$x; done",
    ]);
    assert_eq!(oom.status.code(), Some(137), "oom1: {}", text(&oom.stderr));
    c.assert_clean();
    let _ = events.kill();
    let out = events.wait_with_output().unwrap();
    let seen = text(&out.stdout);
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            seen.contains(topic),
            "containerd got no {topic} event from the shim: {seen}"
        );
    }
}

#[test]
fn ctr_run_with_a_terminal_gives_the_container_a_tty() {
    let c = Containerd::start("tty");
    c.import_busybox();
    // `ctr run -t` needs a terminal of its own: script(1) gives it one, fed by our stdin.
    let ctr = format!(
        "ctr --address {} --namespace {} run -t --rm --runtime {RUNTIME} {IMAGE} tty1 sh",
        c.socket.display(),
        c.namespace
    );
    let mut child = Command::new("script")
        .args(["-q", "-e", "-c", &ctr, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (Debian package bsdutils)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // Typed into the container's terminal: its shell answers through it.
        stdin
            .write_all(b"tty; test -t 0 && echo stdin-is-a-tty; echo tty-$((6*7)); exit 4\n")
            .unwrap();
        // (stdin stays open until the shell is done: EOF would end the session early)
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "ctr run -t did not end: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(stdin);
    }
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(4),
        "stdout {stdout}\nstderr {}\ncontainerd: {}",
        text(&out.stderr),
        c.log()
    );
    assert!(stdout.contains("/dev/pts/"), "tty: {stdout}");
    assert!(stdout.contains("stdin-is-a-tty"), "stdin: {stdout}");
    assert!(
        stdout.contains("tty-42"),
        "the shell ran what was typed: {stdout}"
    );
    c.assert_clean();
}

#[test]
fn a_binary_logger_gets_both_streams_of_a_task() {
    let c = Containerd::start("logger");
    c.import_busybox();
    let logs = c.dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // A logger as containerd defines them: stdout on fd 3, stderr on fd 4, ready = close fd 5.
    let logger = c.dir.join("logger.sh");
    std::fs::write(
        &logger,
        "#!/bin/sh\necho \"$CONTAINER_NAMESPACE/$CONTAINER_ID\" > \"$1/who\"\n\
         exec 5>&-\ncat <&3 > \"$1/out\" &\ncat <&4 > \"$1/err\" &\nwait\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("755")
        .arg(&logger)
        .status()
        .unwrap();
    let uri = format!("binary://{}?{}", logger.display(), logs.display());
    c.ok(&[
        "run",
        "-d",
        "--log-uri",
        &uri,
        "--runtime",
        RUNTIME,
        IMAGE,
        "log1",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tasks = c.ok(&["task", "ls"]);
        if tasks
            .lines()
            .any(|l| l.starts_with("log1") && l.contains("STOPPED"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "log1 did not stop: {tasks}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let read = |name: &str| std::fs::read_to_string(logs.join(name)).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (read("out").is_empty() || read("err").is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(read("who"), format!("{}/log1\n", c.namespace));
    assert_eq!(read("out"), "to-out\n");
    assert_eq!(read("err"), "to-err\n");
    c.ok(&["task", "rm", "log1"]);
    c.ok(&["containers", "rm", "log1"]);
    c.assert_clean();
}

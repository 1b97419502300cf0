//! `brig pause`, `resume`, `update` and `events`: what a user of runc's verbs expects, with
//! the container in a microVM and its cgroup in the guest.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use brig_e2e::{brig, busybox_rootfs, processes_named, text};
use serde_json::Value;

fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("brig-e2e-rootfs-{}", std::process::id()));
        busybox_rootfs(&dir)
    })
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `brig run -d --name NAME FLAGS ROOTFS CMD`.
fn run_detached(test: &str, name: &str, flags: &[&str], cmd: &[&str]) {
    let out = brig(test)
        .args(["run", "-d", "--name", name])
        .args(flags)
        .arg(rootfs())
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "brig run -d: {}", text(&out.stderr));
}

fn brig_ok(test: &str, args: &[&str]) -> Output {
    let out = brig(test).args(args).stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "brig {args:?}: status {:?}, stderr {}",
        out.status.code(),
        text(&out.stderr)
    );
    out
}

/// The STATUS column of `brig ps [-a]` for `name`, if listed.
fn ps_status(test: &str, name: &str, all: bool) -> Option<String> {
    let mut cmd = brig(test);
    cmd.arg("ps");
    if all {
        cmd.arg("-a");
    }
    let ps = cmd.output().unwrap();
    text(&ps.stdout).lines().find_map(|l| {
        let rest = l.strip_prefix(&format!("{name} "))?;
        Some(rest.trim_start().to_string())
    })
}

/// `brig exec NAME cat FILE`, trimmed.
fn cat_in(test: &str, name: &str, file: &str) -> String {
    text(&brig_ok(test, &["exec", name, "cat", file]).stdout)
        .trim()
        .to_string()
}

fn stats(test: &str, name: &str) -> Value {
    let out = brig_ok(test, &["events", "--stats", name]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("events --stats is not JSON ({e}): {}", text(&out.stdout)));
    assert_eq!(v["type"], "stats", "{v}");
    assert_eq!(v["id"], name, "{v}");
    v
}

/// Kill and remove what a test left.
fn cleanup(test: &str, name: &str) {
    let _ = brig(test).args(["rm", "-f", name]).output();
    wait_for("the VMM to go", || processes_named("brig-vmm").is_empty());
}

fn count(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn pause_stops_a_counter_resume_lets_it_go_on_and_a_paused_container_can_be_killed() {
    let t = "pause";
    let dir = brig_e2e::scratch(t);
    let volume = format!("{}:/data", dir.display());
    let counter = dir.join("count");
    run_detached(
        t,
        "ticker",
        &["-v", &volume],
        &[
            "sh",
            "-c",
            // Renamed into place, so the host never reads a half-written count.
            "i=0; while true; do i=$((i+1)); echo $i > /data/.count; mv /data/.count /data/count; sleep 0.1; done",
        ],
    );
    wait_for("the counter to advance", || count(&counter) >= 3);

    // `brig ps ID` lists the container's processes (runc's `ps`): its shell, by PID.
    let table = text(&brig_ok(t, &["ps", "ticker"]).stdout);
    let shell = table
        .lines()
        .find(|l| l.contains("sh -c i=0"))
        .unwrap_or_else(|| panic!("brig ps ticker: {table}"));
    let pid: u32 = shell.split_whitespace().next().unwrap().parse().unwrap();
    let json = brig_ok(t, &["ps", "--format", "json", "ticker"]).stdout;
    let pids: Vec<u32> = serde_json::from_slice(&json).unwrap();
    assert!(pids.contains(&pid), "{pids:?} lacks the shell {pid}");

    brig_ok(t, &["pause", "ticker"]);
    assert_eq!(
        ps_status(t, "ticker", false)
            .as_deref()
            .map(|s| s.starts_with("paused")),
        Some(true),
        "brig ps (without -a) lists the paused container as paused"
    );
    // Whatever was in flight when the freeze began has landed by now.
    std::thread::sleep(Duration::from_millis(500));
    let frozen_at = count(&counter);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        count(&counter),
        frozen_at,
        "the counter does not advance while the container is paused"
    );

    // A paused container is not paused again, nor resumed twice, nor exec'd into.
    let again = brig(t).args(["pause", "ticker"]).output().unwrap();
    assert_eq!(again.status.code(), Some(125));
    assert!(
        text(&again.stderr).contains("paused"),
        "{}",
        text(&again.stderr)
    );
    let exec = brig(t).args(["exec", "ticker", "true"]).output().unwrap();
    assert_ne!(exec.status.code(), Some(0), "exec into a paused container");

    brig_ok(t, &["resume", "ticker"]);
    assert_eq!(
        ps_status(t, "ticker", false)
            .as_deref()
            .map(|s| s.starts_with("running")),
        Some(true)
    );
    wait_for("the counter to advance after resume", || {
        count(&counter) > frozen_at + 2
    });
    let twice = brig(t).args(["resume", "ticker"]).output().unwrap();
    assert_eq!(twice.status.code(), Some(125));
    assert!(
        text(&twice.stderr).contains("only a paused container can be resumed"),
        "{}",
        text(&twice.stderr)
    );

    // SIGKILL reaches a frozen cgroup's processes.
    brig_ok(t, &["pause", "ticker"]);
    brig_ok(t, &["kill", "ticker"]);
    wait_for("the paused container to exit after kill", || {
        ps_status(t, "ticker", true).is_some_and(|s| s.starts_with("exited (137)"))
    });
    wait_for("the VMM to go", || processes_named("brig-vmm").is_empty());
    brig_ok(t, &["rm", "ticker"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn update_changes_the_limits_the_container_sees_and_events_stats_reports_them() {
    let t = "update";
    run_detached(t, "limits", &[], &["sleep", "300"]);
    wait_for("the container to run", || {
        ps_status(t, "limits", false).is_some_and(|s| s.starts_with("running"))
    });

    brig_ok(t, &["update", "--memory", "64m", "limits"]);
    assert_eq!(cat_in(t, "limits", "/sys/fs/cgroup/memory.max"), "67108864");
    brig_ok(t, &["update", "--pids-limit", "5", "limits"]);
    assert_eq!(cat_in(t, "limits", "/sys/fs/cgroup/pids.max"), "5");
    brig_ok(
        t,
        &[
            "update",
            "--cpu-quota",
            "50000",
            "--cpu-period",
            "100000",
            "limits",
        ],
    );
    assert_eq!(
        cat_in(t, "limits", "/sys/fs/cgroup/cpu.max"),
        "50000 100000"
    );
    brig_ok(t, &["update", "--cpu-shares", "1024", "limits"]);
    assert_eq!(cat_in(t, "limits", "/sys/fs/cgroup/cpu.weight"), "39");

    // A bad value is refused, naming the field, and changes nothing.
    let bad = brig(t)
        .args(["update", "--memory", "128m", "--cpu-shares", "1", "limits"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(125));
    assert!(
        text(&bad.stderr).contains("cpu_shares"),
        "{}",
        text(&bad.stderr)
    );
    assert_eq!(cat_in(t, "limits", "/sys/fs/cgroup/memory.max"), "67108864");

    let v = stats(t, "limits");
    let data = &v["data"];
    assert!(
        data["memory"]["usage"]["usage"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    assert_eq!(data["memory"]["usage"]["limit"], 67_108_864u64, "{v}");
    assert!(data["pids"]["current"].as_u64().unwrap_or(0) >= 1, "{v}");
    assert_eq!(data["pids"]["limit"], 5, "{v}");
    assert!(data["cpu"]["usage"]["total"].as_u64().is_some(), "{v}");
    assert!(data["memory"]["raw"]["anon"].as_u64().is_some(), "{v}");
    assert_eq!(data["memory"]["events"]["oom_kill"], 0, "{v}");

    cleanup(t, "limits");
}

#[test]
fn an_oom_kill_shows_in_stats_and_as_an_oom_event() {
    let t = "oom-events";
    // The container waits for the go-ahead, then runs a hog that its 64M limit kills, and
    // stays alive itself.
    run_detached(
        t,
        "hog",
        &["--memory", "64m"],
        &[
            "sh",
            "-c",
            "while [ ! -e /tmp/go ]; do sleep 0.2; done; \
             dd if=/dev/zero of=/dev/null bs=200M count=1; exec sleep 300",
        ],
    );
    wait_for("the container to run", || {
        ps_status(t, "hog", false).is_some_and(|s| s.starts_with("running"))
    });
    assert_eq!(stats(t, "hog")["data"]["memory"]["events"]["oom_kill"], 0);

    let mut events = brig(t)
        .args(["events", "hog"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = events.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    // Give `brig events` time to reach the agent before the kill happens.
    std::thread::sleep(Duration::from_secs(2));
    brig_ok(t, &["exec", "hog", "touch", "/tmp/go"]);

    let line = rx.recv_timeout(Duration::from_secs(90));
    let _ = events.kill();
    let _ = events.wait();
    let line = line.expect("brig events printed an OOM event");
    let event: Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    assert_eq!(event["type"], "oom", "{event}");
    assert_eq!(event["id"], "hog", "{event}");

    let v = stats(t, "hog");
    assert!(
        v["data"]["memory"]["events"]["oom_kill"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{v}"
    );
    assert_eq!(v["data"]["memory"]["usage"]["limit"], 64u64 << 20, "{v}");
    // The container itself lives on.
    assert_eq!(
        ps_status(t, "hog", false)
            .as_deref()
            .map(|s| s.starts_with("running")),
        Some(true)
    );
    cleanup(t, "hog");
}

#[test]
fn run_d_without_a_name_prints_the_id_it_runs_under() {
    let t = "unnamed";
    let started = Instant::now();
    let out = brig(t)
        .args(["run", "-d", "--network", "none"])
        .arg(rootfs())
        .args(["sleep", "100"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "brig run -d: {}", text(&out.stderr));
    // It returns once the container runs, not when it ends.
    assert!(started.elapsed() < Duration::from_secs(120));
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(id.len(), 12, "an ID on stdout: {id:?}");
    assert_eq!(
        ps_status(t, &id, false)
            .as_deref()
            .map(|s| s.starts_with("running")),
        Some(true),
        "brig ps lists {id} as running"
    );
    cleanup(t, &id);
}

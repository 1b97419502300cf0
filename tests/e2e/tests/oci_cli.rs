//! Brig as an OCI runtime CLI, driven as an engine drives runc: a bundle made by `runc spec`,
//! `create --bundle --pid-file`, `state`, `start`, `kill`, `delete`. The process in the PID
//! file stands for the container: it has the stdio `create` was given and exits with the
//! container's status, and engines (conmon) wait for it as its subreaper, as this test does.

use std::io::{BufRead, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use brig_e2e::{brig, busybox_rootfs, processes_named, scratch, text};

/// A bundle in `dir` made by `runc spec`, as an engine writes one, running `script` without a
/// terminal.
fn bundle(dir: &Path, script: &str) {
    busybox_rootfs(dir);
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "runc spec: {}", text(&out.stderr));
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(["sh", "-c", script]);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// This process adopts orphans (the keepers `brig create` leaves), as conmon does.
fn become_subreaper() {
    // SAFETY: prctl with plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
}

/// `brig create`, with its stdout and stderr on pipes the keeper keeps, and stdin from
/// `input`. Returns the finished `create` (its pipes still open) and the PID in the PID file.
fn brig_create(test: &str, dir: &Path, id: &str, input: &[u8]) -> (Child, u32) {
    let stdin = dir.join("stdin");
    std::fs::write(&stdin, input).unwrap();
    let pid_file = dir.join("pid");
    let mut child = brig(test)
        .args(["create", "--bundle"])
        .arg(dir)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .stdin(std::fs::File::open(&stdin).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    if !status.success() {
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("brig create: {status:?}: {err}");
    }
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .parse()
        .expect("a PID in the PID file");
    (child, pid)
}

/// `brig state` as JSON.
fn state(test: &str, id: &str) -> serde_json::Value {
    let out = brig(test).args(["state", id]).output().unwrap();
    assert!(out.status.success(), "brig state: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("state is JSON")
}

fn ok(test: &str, args: &[&str]) {
    let out = brig(test).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "brig {args:?}: {:?}: {}",
        out.status,
        text(&out.stderr)
    );
}

/// Reap every child this process adopted (a VMM whose keeper was killed lands here), for
/// up to 10 s: a zombie still counts as a process left.
fn reap_adopted() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        match waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Wait for our adopted child `pid`: its exit code.
fn exit_code(pid: u32) -> i32 {
    match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap() {
        nix::sys::wait::WaitStatus::Exited(_, code) => code,
        other => panic!("the keeper ended as {other:?}"),
    }
}

#[test]
fn a_container_is_created_started_and_deleted_as_runc_does_with_its_stdio_and_status() {
    let test = "oci-lifecycle";
    become_subreaper();
    let dir = scratch(test);
    bundle(
        &dir,
        "echo out-$(hostname); echo err >&2; read line; echo got-$line; exit 3",
    );
    let (mut create, pid) = brig_create(test, &dir, "lifecycle", b"hello\n");
    let created = state(test, "lifecycle");
    assert_eq!(created["ociVersion"], "1.0.2", "{created}");
    assert_eq!(created["id"], "lifecycle", "{created}");
    assert_eq!(created["status"], "created", "{created}");
    assert_eq!(created["pid"], pid, "{created}");
    assert_eq!(created["bundle"], dir.display().to_string(), "{created}");
    assert_eq!(brig_e2e::vmm_processes().len(), 1, "one microVM");

    ok(test, &["start", "lifecycle"]);
    assert_eq!(
        exit_code(pid),
        3,
        "the keeper exits with the container's status"
    );
    let mut out = String::new();
    create
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    create
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    // runc spec names the host "runc"; stdin came from create's stdin.
    assert_eq!(out, "out-runc\ngot-hello\n", "stderr: {err}");
    assert_eq!(err, "err\n");

    let stopped = state(test, "lifecycle");
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    assert_eq!(stopped["pid"], 0, "{stopped}");
    ok(test, &["delete", "lifecycle"]);
    let gone = brig(test).args(["state", "lifecycle"]).output().unwrap();
    assert!(!gone.status.success());
    assert!(
        text(&gone.stderr).contains("does not exist"),
        "runc's words, which engines read: {}",
        text(&gone.stderr)
    );
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_running_container_takes_signals_and_is_deleted_only_by_force() {
    let test = "oci-signals";
    become_subreaper();
    let dir = scratch(test);
    bundle(
        &dir,
        "trap 'echo term; exit 42' TERM; echo ready; while true; do sleep 1; done",
    );
    let (mut create, pid) = brig_create(test, &dir, "trapper", b"");
    ok(test, &["start", "trapper"]);
    let mut stdout = std::io::BufReader::new(create.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    assert_eq!(state(test, "trapper")["status"], "running");

    // exec --process, as conmon runs it: in the foreground with the process's status, and
    // detached, leaving a keeper in the PID file that exits with it.
    let process = |script: &str| {
        let path = dir.join(format!("process-{}.json", script.len()));
        let json = serde_json::json!({
            "args": ["sh", "-c", script], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "env": ["PATH=/bin:/sbin"], "terminal": false,
        });
        std::fs::write(&path, json.to_string()).unwrap();
        path
    };
    let out = brig(test)
        .args(["exec", "--process"])
        .arg(process("echo exec-out; exit 7"))
        .arg("trapper")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "exec-out\n");
    let exec_pid_file = dir.join("exec.pid");
    let detached = brig(test)
        .args(["exec", "--detach", "--pid-file"])
        .arg(&exec_pid_file)
        .arg("--process")
        .arg(process("sleep 1; exit 9"))
        .arg("trapper")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(detached.success(), "exec --detach: {detached:?}");
    let exec_pid: u32 = std::fs::read_to_string(&exec_pid_file)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        exit_code(exec_pid),
        9,
        "the exec keeper exits with its status"
    );

    // A running container is not deleted without --force, and nothing happens to it.
    let refused = brig(test).args(["delete", "trapper"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(125));
    assert!(
        text(&refused.stderr).contains("is running"),
        "{}",
        text(&refused.stderr)
    );
    assert_eq!(state(test, "trapper")["status"], "running");

    ok(test, &["kill", "trapper", "TERM"]);
    assert_eq!(exit_code(pid), 42, "the trap's status");
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "term\n");
    ok(test, &["delete", "trapper"]);

    // --force takes a running one, microVM and keeper with it.
    let (_create, pid) = brig_create(test, &dir, "forced", b"");
    ok(test, &["start", "forced"]);
    ok(test, &["delete", "--force", "forced"]);
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None).unwrap();
    assert!(
        matches!(
            status,
            nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)
        ),
        "the keeper: {status:?}"
    );
    reap_adopted();
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    assert!(
        brig_e2e::dir_entries(Path::new("/run/brig-e2e/oci-signals/containers")).is_empty(),
        "records left"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_oci_cli_input_is_one_clear_line() {
    let test = "oci-bad";
    let dir = scratch(test);
    for (args, words) in [
        (vec!["start", "nosuch"], "does not exist"),
        (vec!["state", "nosuch"], "does not exist"),
        (vec!["delete", "nosuch"], "does not exist"),
        (vec!["kill", "nosuch", "TERM"], "does not exist"),
        (
            vec!["create", "--bundle", "/nonexistent", "x"],
            "/nonexistent",
        ),
        (
            vec!["create", "--bundle", dir.to_str().unwrap(), "x"],
            "has no config.json",
        ),
    ] {
        let out = brig(test).args(&args).output().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(words), "{args:?}: {err:?} lacks {words:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Sets `config.json`'s hooks in the bundle at `dir`.
fn set_hooks(dir: &Path, hooks: serde_json::Value) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["hooks"] = hooks;
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// A hook that saves its stdin (the container's state) to `file`.
fn saving_hook(file: &Path) -> serde_json::Value {
    serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", file.display())]})
}

fn saved_status(file: &Path) -> Option<String> {
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    Some(format!(
        "{} {}",
        state["id"].as_str()?,
        state["status"].as_str()?
    ))
}

#[test]
fn hooks_run_on_the_host_at_their_moments_with_the_state_on_stdin() {
    let test = "oci-hooks";
    become_subreaper();
    let dir = scratch(test);
    bundle(&dir, "sleep 1; exit 0");
    let (created, started, stopped) = (
        dir.join("created.json"),
        dir.join("started.json"),
        dir.join("stopped.json"),
    );
    set_hooks(
        &dir,
        serde_json::json!({
            "createRuntime": [saving_hook(&created)],
            "poststart": [saving_hook(&started)],
            "poststop": [saving_hook(&stopped)],
        }),
    );
    let (_create, pid) = brig_create(test, &dir, "hooked", b"");
    let after_create = (saved_status(&created), saved_status(&started));
    ok(test, &["start", "hooked"]);
    let code = exit_code(pid);
    let after_start = saved_status(&started);
    ok(test, &["delete", "hooked"]);
    let after_delete = saved_status(&stopped);

    // `brig create` that is expected to fail: its output, keeper and all.
    let create = |id: &str| {
        brig(test)
            .args(["create", "--bundle"])
            .arg(&dir)
            .arg(id)
            .output()
            .unwrap()
    };
    // A createRuntime hook that fails stops the container: create fails, naming it.
    set_hooks(
        &dir,
        serde_json::json!({"createRuntime": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo refused >&2; exit 1"]}]}),
    );
    let failed = create("refused");
    reap_adopted();
    let refused_state = brig(test).args(["state", "refused"]).output().unwrap();
    // Hooks meant for the container's namespaces cannot run in a microVM: refused up front.
    set_hooks(
        &dir,
        serde_json::json!({"createContainer": [{"path": "/bin/true"}]}),
    );
    let in_guest = create("in-guest");
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(after_create, (Some("hooked created".into()), None));
    assert_eq!(code, 0);
    assert_eq!(after_start.as_deref(), Some("hooked running"));
    assert_eq!(after_delete.as_deref(), Some("hooked stopped"));
    let err = text(&failed.stderr);
    assert_eq!(failed.status.code(), Some(125), "{err}");
    assert!(
        err.contains("hooks.createRuntime[0]") && err.contains("refused"),
        "{err}"
    );
    assert!(
        !refused_state.status.success(),
        "the refused container was kept"
    );
    let err = text(&in_guest.stderr);
    assert_eq!(in_guest.status.code(), Some(125), "{err}");
    assert!(err.contains("hooks.createContainer"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
}

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

/// The VMM PID recorded for sandbox `id` of `test`.
fn vmm_pid(test: &str, id: &str) -> u32 {
    let record = Path::new("/run/brig-e2e")
        .join(test)
        .join("sandboxes")
        .join(id)
        .join("sandbox.json");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    record["vmm"]["pid"].as_u64().unwrap() as u32
}

/// `brig ARGS`, which must succeed, while this process reaps the adopted children `pids` it
/// kills, as conmon (or init) reaps them: their wait statuses. (A VMM is adopted once its
/// keeper is gone.)
fn ok_reaping(test: &str, args: &[&str], pids: &[u32]) -> Vec<nix::sys::wait::WaitStatus> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut child = brig(test)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut statuses: Vec<Option<WaitStatus>> = vec![None; pids.len()];
    let status = loop {
        for (pid, status) in pids.iter().zip(statuses.iter_mut()) {
            if status.is_none() {
                let pid = nix::unistd::Pid::from_raw(*pid as i32);
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => {}
                    Ok(s) => *status = Some(s),
                    // Not ours yet: a VMM whose keeper still runs.
                    Err(nix::errno::Errno::ECHILD) => {}
                    Err(e) => panic!("waiting for {pid}: {e}"),
                }
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "brig {args:?}: {status:?}: {err}");
    pids.iter()
        .zip(statuses)
        .map(|(pid, s)| {
            s.unwrap_or_else(|| waitpid(nix::unistd::Pid::from_raw(*pid as i32), None).unwrap())
        })
        .collect()
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
    assert_sigkilled("the keeper", &status);
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
fn brig_run_of_a_bundle_runs_its_hooks_as_runc_run_does() {
    let test = "run-hooks";
    let dir = scratch(test);
    bundle(&dir, "echo ran");
    let saved = |name: &str| dir.join(format!("{name}.json"));
    set_hooks(
        &dir,
        serde_json::json!({
            "createRuntime": [saving_hook(&saved("createRuntime"))],
            "createContainer": [saving_hook(&saved("createContainer"))],
            "poststart": [saving_hook(&saved("poststart"))],
            "poststop": [saving_hook(&saved("poststop"))],
        }),
    );
    // --rm: every host hook, the last once the container is gone.
    let run = brig(test)
        .args(["run", "--rm", "--network", "none", "--name", "once"])
        .arg(&dir)
        .output()
        .unwrap();
    let seen: Vec<Option<String>> = ["createRuntime", "createContainer", "poststart", "poststop"]
        .iter()
        .map(|name| saved_status(&saved(name)))
        .collect();
    // Kept: its poststop hook comes with `brig rm`.
    let _ = std::fs::remove_file(saved("poststop"));
    let kept = brig(test)
        .args(["run", "--network", "none", "--name", "kept"])
        .arg(&dir)
        .output()
        .unwrap();
    let before_rm = saved_status(&saved("poststop"));
    let rm = brig(test).args(["rm", "kept"]).output().unwrap();
    let after_rm = saved_status(&saved("poststop"));
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    assert_eq!(text(&run.stdout), "ran\n");
    assert_eq!(
        seen,
        [
            Some("once created".to_string()),
            Some("once created".to_string()),
            Some("once running".to_string()),
            Some("once stopped".to_string()),
        ]
    );
    assert_eq!(kept.status.code(), Some(0), "{}", text(&kept.stderr));
    assert_eq!(before_rm, None, "poststop before the container was removed");
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert_eq!(after_rm.as_deref(), Some("kept stopped"));
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
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
    // A hook whose path is not absolute (the spec requires one) is refused up front.
    set_hooks(
        &dir,
        serde_json::json!({"startContainer": [{"path": "hooks/start.sh"}]}),
    );
    let relative = create("relative");
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
    let err = text(&relative.stderr);
    assert_eq!(relative.status.code(), Some(125), "{err}");
    assert!(
        err.contains("hooks.startContainer[0]: path hooks/start.sh is not absolute"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
}

/// An executable script at `path` in the bundle's root filesystem (busybox's sh runs it).
fn rootfs_script(dir: &Path, path: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join("rootfs").join(path.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The rest of a finished keeper's stdout and stderr (`brig create`'s pipes).
fn keeper_output(create: &mut Child) -> (String, String) {
    let (mut out, mut err) = (String::new(), String::new());
    create
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    create
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (out, err)
}

#[test]
fn container_hooks_run_on_the_host_in_the_vmms_network_and_in_the_guest_before_the_command() {
    use std::os::unix::fs::MetadataExt;
    let test = "oci-container-hooks";
    become_subreaper();
    let dir = scratch(test);
    // The container's own command shows what its startContainer hook left in its /dev/shm
    // (a tmpfs of its own: the root of `runc spec` is read-only).
    bundle(&dir, "cat /dev/shm/hook /dev/shm/state.json");
    let netns = format!("brig-e2e-hooks-{}", std::process::id());
    let ns = Command::new("ip")
        .args(["netns", "add", &netns])
        .output()
        .unwrap();
    assert!(ns.status.success(), "ip netns add: {}", text(&ns.stderr));
    let netns_path = Path::new("/run/netns").join(&netns);
    let netns_inode = std::fs::metadata(&netns_path).unwrap().ino();
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    config["annotations"] = serde_json::json!({"org.example.owner": "hooks-test"});
    for ns in config["linux"]["namespaces"].as_array_mut().unwrap() {
        if ns["type"] == "network" {
            ns["path"] = netns_path.display().to_string().into();
        }
    }
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    rootfs_script(
        &dir,
        "/hooks/start.sh",
        "cat > /dev/shm/state.json; echo \"$0 $1 $MARK uid=$(id -u)\" > /dev/shm/hook",
    );
    rootfs_script(
        &dir,
        "/hooks/refuse.sh",
        "echo \"not ready: $(id -u)\" >&2; exit 3",
    );
    let (created_state, created_netns) = (dir.join("created.json"), dir.join("created.netns"));
    set_hooks(
        &dir,
        serde_json::json!({
            "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", format!(
                "cat > {}; readlink /proc/self/ns/net > {}",
                created_state.display(),
                created_netns.display()
            )]}],
            "startContainer": [{"path": "/hooks/start.sh", "args": ["start-hook", "one"],
                "env": ["MARK=from-hook"], "timeout": 20}],
        }),
    );
    let (mut create, pid) = brig_create(test, &dir, "inside", b"");
    let after_create = (
        saved_status(&created_state),
        std::fs::read_to_string(&created_netns).ok(),
    );
    ok(test, &["start", "inside"]);
    let code = exit_code(pid);
    let (out, err) = keeper_output(&mut create);
    ok(test, &["delete", "inside"]);

    // A failing startContainer hook: `start` fails, the command never runs, and the keeper
    // (the container's stderr, as engines show it) says which hook failed and how.
    config["process"]["args"] = serde_json::json!(["sh", "-c", "echo the command ran"]);
    config["process"]["user"] = serde_json::json!({"uid": 0, "gid": 0});
    config["hooks"] = serde_json::json!({"startContainer": [{"path": "/hooks/refuse.sh"}]});
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let (mut refused, refused_pid) = brig_create(test, &dir, "refused", b"");
    let start = brig(test).args(["start", "refused"]).output().unwrap();
    let refused_code = exit_code(refused_pid);
    let (refused_out, refused_err) = keeper_output(&mut refused);
    let _ = brig(test).args(["delete", "--force", "refused"]).output();
    reap_adopted();
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    let _ = std::fs::remove_dir_all(&dir);

    // createContainer: on the host, with the state, in the network namespace the spec
    // names (the VMM's), before `create` returned.
    assert_eq!(after_create.0.as_deref(), Some("inside created"));
    assert_eq!(
        after_create.1.as_deref().map(str::trim_end),
        Some(format!("net:[{netns_inode}]").as_str())
    );
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    // startContainer: in the container (its /dev/shm, its user), before the command.
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        // (a script's $0 is its path: the kernel starts `sh /hooks/start.sh one`)
        Some("/hooks/start.sh one from-hook uid=1000"),
        "stdout: {out}\nstderr: {err}"
    );
    let state: serde_json::Value =
        serde_json::from_str(lines.next().unwrap_or_default()).expect("the state as JSON");
    assert_eq!(state["id"], "inside", "{state}");
    assert_eq!(state["status"], "created", "{state}");
    assert_eq!(state["pid"], 1, "{state}");
    assert_eq!(state["bundle"], dir.display().to_string(), "{state}");
    assert_eq!(
        state["annotations"],
        serde_json::json!({"org.example.owner": "hooks-test"}),
        "{state}"
    );

    assert!(
        !start.status.success(),
        "start of a refused container succeeded: {}\nkeeper's stdout: {refused_out}\n\
         keeper's stderr: {refused_err}",
        text(&start.stderr)
    );
    assert!(
        text(&start.stderr).contains("failed to start"),
        "{}",
        text(&start.stderr)
    );
    assert_ne!(refused_code, 0);
    assert!(
        !refused_out.contains("the command ran"),
        "the command ran: {refused_out}"
    );
    assert!(
        refused_err.contains("hooks.startContainer[0] (/hooks/refuse.sh) failed")
            && refused_err.contains("exit status: 3")
            && refused_err.contains("not ready: 0"),
        "{refused_err}"
    );
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
}

/// Where the test's pod has its IPC namespace pinned, as CRI-O pins a pod's (the sandbox's
/// spec and a member's name the path, which need not exist for a microVM).
const PINNED_IPC: &str = "/var/run/ipcns/brig-e2e-pod";

/// Sets `config.json`'s annotations in the bundle at `dir`, and for a member (`joined`) makes
/// its IPC and UTS namespaces name `/proc/PID/ns/KIND` of the sandbox's `pid`, as CRI-O joins
/// a pod's containers to its sandbox's; a sandbox gets a hostname and the pinned IPC path.
fn set_pod(dir: &Path, annotations: serde_json::Value, joined: Option<u32>, cgroup: Option<&str>) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["annotations"] = annotations;
    if let Some(pid) = joined {
        // A container that joins a UTS namespace names no hostname (runc refuses one).
        config.as_object_mut().unwrap().remove("hostname");
        for ns in config["linux"]["namespaces"].as_array_mut().unwrap() {
            let kind = ns["type"].as_str().unwrap().to_string();
            if kind == "ipc" || kind == "uts" {
                ns["path"] = format!("/proc/{pid}/ns/{kind}").into();
            }
        }
    } else {
        config["hostname"] = "podhost".into();
        for ns in config["linux"]["namespaces"].as_array_mut().unwrap() {
            if ns["type"] == "ipc" {
                ns["path"] = PINNED_IPC.into();
            }
        }
    }
    if let Some(cgroup) = cgroup {
        config["linux"]["cgroupsPath"] = cgroup.into();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

/// CRI-O's annotations: a pod's sandbox container, or a container of sandbox `sandbox`.
fn crio(kind: &str, sandbox: &str) -> serde_json::Value {
    serde_json::json!({
        "io.kubernetes.cri-o.ContainerType": kind,
        "io.kubernetes.cri-o.SandboxID": sandbox,
    })
}

/// The first `n` lines a created container wrote to its stdout.
fn lines(
    create: &mut Child,
    n: usize,
) -> (Vec<String>, std::io::BufReader<std::process::ChildStdout>) {
    let mut out = std::io::BufReader::new(create.stdout.take().unwrap());
    let mut got = Vec::new();
    for _ in 0..n {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        got.push(line.trim_end().to_string());
    }
    (got, out)
}

/// Mount points under `dir`, from this process's mount table.
fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

#[test]
fn a_pods_containers_join_the_microvm_of_its_sandbox_container_as_crio_names_it() {
    let test = "oci-pod";
    become_subreaper();
    let base = scratch(test);
    let root = Path::new("/run/brig-e2e/oci-pod");
    let vmms_before = brig_e2e::vmm_processes().len();
    let script = "trap 'exit 5' TERM; cat /proc/sys/kernel/random/boot_id; hostname; \
                  readlink /proc/self/ns/ipc; echo ready; while true; do sleep 1; done";

    // The pod's sandbox container boots the microVM.
    let sandbox_dir = base.join("sandbox");
    std::fs::create_dir_all(&sandbox_dir).unwrap();
    bundle(&sandbox_dir, script);
    set_pod(&sandbox_dir, crio("sandbox", "pod"), None, None);
    let (mut sandbox_create, sandbox_pid) = brig_create(test, &sandbox_dir, "pod", b"");
    ok(test, &["start", "pod"]);
    let (sandbox_out, _sandbox_stdout) = lines(&mut sandbox_create, 4);
    assert_eq!(sandbox_out[1], "podhost", "{sandbox_out:?}");
    assert_eq!(sandbox_out[3], "ready", "{sandbox_out:?}");
    let (boot_id, ipc) = (sandbox_out[0].clone(), sandbox_out[2].clone());

    let app1_poststop = base.join("app1-poststop.json");
    // Two containers join it, in its IPC and UTS namespaces (app2 names the pinned IPC
    // namespace, as CRI-O does); the first in a cgroup of its own.
    let mut members = Vec::new();
    for (id, cgroup) in [("app1", Some("/brige2e-pod/app1")), ("app2", None)] {
        let dir = base.join(id);
        std::fs::create_dir_all(&dir).unwrap();
        bundle(&dir, script);
        set_pod(&dir, crio("container", "pod"), Some(sandbox_pid), cgroup);
        if id == "app1" {
            // Deleted along with the sandbox by `--force`: its poststop hook runs still.
            set_hooks(
                &dir,
                serde_json::json!({"poststop": [saving_hook(&app1_poststop)]}),
            );
        }
        if id == "app2" {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let from = format!("/proc/{sandbox_pid}/ns/ipc");
            assert!(text.contains(&from));
            std::fs::write(&path, text.replace(&from, PINNED_IPC)).unwrap();
        }
        let (mut create, pid) = brig_create(test, &dir, id, b"");
        assert_eq!(state(test, id)["status"], "created");
        ok(test, &["start", id]);
        let (out, stdout) = lines(&mut create, 4);
        assert_eq!(
            out,
            [boot_id.as_str(), "podhost", ipc.as_str(), "ready"],
            "{id}: the sandbox's kernel, hostname and IPC namespace"
        );
        let running = state(test, id);
        assert_eq!(running["status"], "running", "{running}");
        assert_eq!(running["pid"], pid, "{running}");
        members.push((id, pid, create, stdout));
    }
    assert_eq!(
        brig_e2e::vmm_processes().len(),
        vmms_before + 1,
        "one microVM for the pod"
    );
    let keeper_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", members[0].1)).unwrap();
    assert!(
        keeper_cgroup.trim_end().ends_with("/brige2e-pod/app1"),
        "the keeper is in its cgroupsPath: {keeper_cgroup}"
    );

    // exec, pause/resume, update and ps reach a member.
    let process = base.join("process.json");
    std::fs::write(
        &process,
        serde_json::json!({
            "args": ["sh", "-c", "cat /proc/sys/kernel/random/boot_id; exit 4"], "cwd": "/",
            "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"], "terminal": false,
        })
        .to_string(),
    )
    .unwrap();
    let exec = brig(test)
        .args(["exec", "--process"])
        .arg(&process)
        .arg("app1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(4), "{}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout).trim_end(), boot_id);
    ok(test, &["pause", "app1"]);
    assert_eq!(state(test, "app1")["status"], "paused");
    ok(test, &["resume", "app1"]);
    assert_eq!(state(test, "app1")["status"], "running");
    ok(test, &["update", "--pids-limit", "50", "app1"]);
    let ps = brig(test)
        .args(["ps", "-f", "json", "app1"])
        .output()
        .unwrap();
    assert!(ps.status.success(), "{}", text(&ps.stderr));
    let pids: Vec<u32> = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(!pids.is_empty(), "{}", text(&ps.stdout));

    // A member stops and is deleted: only it goes, the pod runs on.
    let (_, app2_pid, _, _) = &members[1];
    ok(test, &["kill", "app2", "TERM"]);
    assert_eq!(
        exit_code(*app2_pid),
        5,
        "the member's keeper exits with its status"
    );
    assert_eq!(state(test, "app2")["status"], "stopped");
    ok(test, &["delete", "app2"]);
    let gone = brig(test).args(["state", "app2"]).output().unwrap();
    assert!(
        text(&gone.stderr).contains("does not exist"),
        "{}",
        text(&gone.stderr)
    );
    let shared = root.join("sandboxes/pod/shared");
    assert_eq!(
        brig_e2e::dir_entries(&shared),
        ["app1", "pod"],
        "app2's share is gone"
    );
    assert!(
        mounts_under(&shared.join("app2")).is_empty(),
        "app2's binds are gone"
    );
    assert_eq!(state(test, "pod")["status"], "running");
    assert_eq!(state(test, "app1")["status"], "running");
    assert_eq!(brig_e2e::vmm_processes().len(), vmms_before + 1);

    // A sandbox that does not exist, or is stopped, is one clear line and leaves nothing.
    let orphan = base.join("orphan");
    std::fs::create_dir_all(&orphan).unwrap();
    bundle(&orphan, "true");
    for (sandbox, words) in [("nosuch", "does not exist"), ("pod2", "is stopped")] {
        if sandbox == "pod2" {
            // A pod's sandbox container whose command exited: its microVM is kept for
            // `delete`, but nothing can join it.
            let dir = base.join("pod2");
            std::fs::create_dir_all(&dir).unwrap();
            bundle(&dir, "true");
            set_pod(&dir, crio("sandbox", "pod2"), None, None);
            let (_create, pid) = brig_create(test, &dir, "pod2", b"");
            ok(test, &["start", "pod2"]);
            assert_eq!(exit_code(pid), 0);
            assert_eq!(brig_e2e::vmm_processes().len(), vmms_before + 2);
        }
        set_pod(&orphan, crio("container", sandbox), None, None);
        let out = brig(test)
            .args(["create", "--bundle"])
            .arg(&orphan)
            .arg("orphan")
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(err.contains(sandbox) && err.contains(words), "{err}");
        assert!(err.contains("io.kubernetes.cri-o.SandboxID"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            !root.join("containers/orphan").exists(),
            "a record of the refused container"
        );
    }
    ok_reaping(test, &["delete", "pod2"], &[vmm_pid(test, "pod2")]);
    assert_eq!(brig_e2e::vmm_processes().len(), vmms_before + 1);

    // The pod's microVM outlives its sandbox container's command: the members run on.
    ok(test, &["kill", "pod", "TERM"]);
    assert_eq!(exit_code(sandbox_pid), 5);
    assert_eq!(state(test, "pod")["status"], "stopped");
    assert_eq!(state(test, "app1")["status"], "running");
    let exec = brig(test)
        .args(["exec", "--process"])
        .arg(&process)
        .arg("app1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(exec.status.code(), Some(4), "{}", text(&exec.stderr));

    // The sandbox container goes only with its members: named, or deleted with --force.
    let refused = brig(test).args(["delete", "pod"]).output().unwrap();
    let err = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(125), "{err}");
    assert!(err.contains("app1") && err.contains("--force"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(state(test, "app1")["status"], "running");
    let keepers = [members[0].1];
    let vmm = vmm_pid(test, "pod");
    let statuses = ok_reaping(test, &["delete", "--force", "pod"], &[keepers[0], vmm]);
    for (pid, status) in keepers.iter().zip(&statuses) {
        assert_sigkilled(&format!("keeper {pid}"), status);
    }
    assert_eq!(
        saved_status(&app1_poststop).as_deref(),
        Some("app1 stopped"),
        "the poststop hook of a member deleted with the sandbox"
    );
    reap_adopted();
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    assert!(
        brig_e2e::dir_entries(&root.join("containers")).is_empty(),
        "records left"
    );
    assert!(
        brig_e2e::dir_entries(&root.join("sandboxes")).is_empty(),
        "sandboxes left"
    );
    assert!(
        brig_e2e::dir_entries(&root.join("v")).is_empty(),
        "vsock links left"
    );
    assert!(
        mounts_under(root).is_empty(),
        "mounts left: {:?}",
        mounts_under(root)
    );
    assert!(
        !Path::new("/sys/fs/cgroup/brige2e-pod/app1").exists(),
        "the member's cgroup is left"
    );
    let _ = std::fs::remove_dir("/sys/fs/cgroup/brige2e-pod");
    std::fs::remove_dir_all(base).unwrap();
}

/// A console socket at `path`, as conmon listens on one: the terminal master `brig create`
/// sends, received on a thread and kept open (returned when the thread is joined).
fn console_socket(path: &Path) -> std::thread::JoinHandle<std::os::fd::OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut name = [0u8; 256];
        let mut iov = [std::io::IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                // SAFETY: the descriptor just arrived with the message: nothing else owns it.
                return unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
            }
        }
        panic!("no terminal master in the console socket's message");
    })
}

#[test]
fn a_pods_microvm_outlives_a_sandbox_container_that_had_a_terminal() {
    let test = "oci-pod-tty";
    become_subreaper();
    let dir = scratch(test);
    let vmms_before = brig_e2e::vmm_processes().len();
    bundle(&dir, "echo up; sleep 1");
    set_pod(&dir, crio("sandbox", "podtty"), None, None);
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["terminal"] = true.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let socket = dir.join("console.sock");
    let master = console_socket(&socket);
    let pid_file = dir.join("pid");
    // The keeper keeps create's stderr: a file, not a pipe to wait on.
    let stderr = dir.join("stderr");
    let created = brig(test)
        .args(["create", "--bundle"])
        .arg(&dir)
        .arg("--console-socket")
        .arg(&socket)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("podtty")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .status()
        .unwrap();
    assert!(
        created.success(),
        "{}",
        std::fs::read_to_string(&stderr).unwrap()
    );
    let master = master.join().unwrap();
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    ok(test, &["start", "podtty"]);
    // The keeper, which held the terminal as its session's, exits with the command: the
    // hangup that follows is not the microVM's, which stays for the pod.
    assert_eq!(exit_code(pid), 0);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let vmm = vmm_pid(test, "podtty");
    let stat = std::fs::read_to_string(format!("/proc/{vmm}/stat")).unwrap_or_default();
    let vmm_state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
    assert!(
        matches!(vmm_state, Some(s) if s != "Z"),
        "the pod's microVM went with the keeper's terminal: {stat}"
    );
    assert_eq!(brig_e2e::vmm_processes().len(), vmms_before + 1);
    drop(master);
    ok_reaping(test, &["delete", "podtty"], &[vmm]);
    assert!(processes_named("brig-vmm").is_empty(), "a brig-vmm is left");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `what` ended by SIGKILL (as `delete --force` ends a keeper).
fn assert_sigkilled(what: &str, status: &nix::sys::wait::WaitStatus) {
    assert!(
        matches!(
            status,
            nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)
        ),
        "{what}: {status:?}"
    );
}

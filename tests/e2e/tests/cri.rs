//! Kubernetes pods through containerd's CRI, as kubelet drives them: a CRI client built from
//! the CRI api.proto talks to Debian's containerd 1.6, whose runtime handler `sandboxed` is
//! Brig (configured with `configs/containerd.toml`). Each pod is one microVM behind one
//! `containerd-shim-brig-v2`. There is no CNI here: pods use the host's network.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use brig_e2e::containerd::{Containerd, IMAGE};
use brig_e2e::cri::{api, container_config, pod_config, Cri, Session};
use brig_e2e::processes_named;

/// The runtime handler of `configs/containerd.toml` (a RuntimeClass's `handler`).
const HANDLER: &str = "sandboxed";

/// Wait until the CRI log file `path` has a line of `stream` ("stdout"/"stderr") starting
/// with `prefix`, in CRI's format (`TIMESTAMP STREAM F TEXT`); returns TEXT.
fn wait_log_line(path: &Path, stream: &str, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        for line in log.lines() {
            let mut parts = line.splitn(4, ' ');
            let (Some(time), Some(s), Some(tag), Some(text)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                panic!("not a CRI log line in {}: {line:?}", path.display());
            };
            assert!(
                time.contains('T') && (tag == "F" || tag == "P"),
                "not a CRI log line in {}: {line:?}",
                path.display()
            );
            if s == stream && text.starts_with(prefix) {
                return text.to_string();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {stream} line starting with {prefix:?} in {}: {log:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A containerd with CRI for test `test`, busybox imported, a CRI client, and a directory
/// for the pods' logs.
fn cri_setup(test: &str) -> (Containerd, Cri, PathBuf) {
    let c = Containerd::start_cri(test);
    c.import_busybox();
    let cri = Cri::connect(&c.socket);
    let logs = c.dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    (c, cri, logs)
}

/// A pod-level cgroup as kubelet makes one (`/brig-e2e-pods/NAME`), set as the pod's
/// cgroup parent: CRI puts the sandbox in `<parent>/<pod id>`.
fn with_pod_cgroup(config: &mut api::PodSandboxConfig, name: &str) -> PathBuf {
    let parent = format!("/brig-e2e-pods/{name}");
    let dir = Path::new("/sys/fs/cgroup").join(parent.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    config.linux.as_mut().unwrap().cgroup_parent = parent;
    dir
}

/// The cgroup v2 path of process `pid`.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string()
}

/// After the pod is gone, its cgroup under the parent is gone too; then drop the parent.
fn assert_cgroup_removed(parent: &Path) {
    let left = brig_e2e::dir_entries(parent)
        .into_iter()
        .filter(|e| parent.join(e).is_dir())
        .collect::<Vec<_>>();
    assert!(
        left.is_empty(),
        "cgroups left under {}: {left:?}",
        parent.display()
    );
    let _ = std::fs::remove_dir(parent);
    let _ = std::fs::remove_dir("/sys/fs/cgroup/brig-e2e-pods");
}

/// What a container reports about its namespaces and hostname.
const WHO: &str =
    "echo ipc=$(readlink /proc/self/ns/ipc) uts=$(readlink /proc/self/ns/uts) host=$(hostname)";

#[test]
fn a_cri_pod_of_two_containers_is_one_microvm_sharing_ipc_and_uts() {
    let (c, cri, logs) = cri_setup("cri-pod");
    let mut config = pod_config("pod1", &logs);
    let cgroup = with_pod_cgroup(&mut config, "pod1");
    let pod = cri.run_pod(HANDLER, &config);
    // The shim and the VMM are in the pod's cgroup, where CRI puts a runc pod's pause.
    let want = format!("/brig-e2e-pods/pod1/{pod}");
    for (name, pids) in [
        ("shim", processes_named("containerd-shim")),
        ("VMM", brig_e2e::vmm_processes()),
    ] {
        assert_eq!(pids.len(), 1, "{name}: {pids:?}");
        assert_eq!(cgroup_of(pids[0]), want, "the {name}'s cgroup");
    }
    // The brig.toml that containerd's runtime options name set the state root.
    assert!(
        c.brig_state().join("sandboxes").join(&pod).is_dir(),
        "no sandbox record under {} (was the ConfigPath's root used?)",
        c.brig_state().display()
    );
    let script = format!("{WHO}; echo to-stderr >&2; exec sleep 600");
    let a = cri.run_container(
        &pod,
        &config,
        container_config("a", IMAGE, &["sh", "-c", &script]),
    );
    let b = cri.run_container(
        &pod,
        &config,
        container_config("b", IMAGE, &["sleep", "600"]),
    );
    assert_eq!(brig_e2e::vmm_processes().len(), 1, "one microVM per pod");
    assert_eq!(
        processes_named("containerd-shim").len(),
        1,
        "one shim per pod"
    );

    // Container logs land in the CRI log file, in CRI's format, per stream.
    let seen_by_a = wait_log_line(&logs.join("a.log"), "stdout", "ipc=");
    wait_log_line(&logs.join("a.log"), "stderr", "to-stderr");
    assert!(
        seen_by_a.ends_with("host=pod1-host"),
        "the pod's hostname: {seen_by_a}"
    );

    // b (and an exec in it) sees a's IPC and UTS namespaces: those of the pod.
    let mut rt = cri.runtime.clone();
    let exec = |cmd: &[&str]| {
        let mut rt = cri.runtime.clone();
        cri.call(rt.exec_sync(api::ExecSyncRequest {
            container_id: b.clone(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        }))
    };
    let who = exec(&["sh", "-c", WHO]).expect("ExecSync in b");
    assert_eq!(
        String::from_utf8_lossy(&who.stdout).trim_end(),
        seen_by_a,
        "containers of one pod share IPC and UTS"
    );
    let out = exec(&["sh", "-c", "echo out; echo err >&2; exit 7"]).expect("ExecSync");
    assert_eq!(
        (out.stdout.as_slice(), out.stderr.as_slice(), out.exit_code),
        (&b"out\n"[..], &b"err\n"[..], 7)
    );
    let started = Instant::now();
    let missing = exec(&["no-such-binary"]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "a missing binary fails at once"
    );
    match missing {
        Err(status) => assert!(
            status.message().contains("no-such-binary"),
            "the error names the binary: {status:?}"
        ),
        Ok(r) => panic!("ExecSync of a missing binary succeeded: {r:?}"),
    }

    // Stats of both containers, from the guest's cgroups.
    let stats = cri
        .ok(
            "ListContainerStats",
            rt.list_container_stats(api::ListContainerStatsRequest {
                filter: Some(api::ContainerStatsFilter {
                    pod_sandbox_id: pod.clone(),
                    ..Default::default()
                }),
            }),
        )
        .stats;
    let mut ids: Vec<String> = stats
        .iter()
        .map(|s| s.attributes.as_ref().unwrap().id.clone())
        .collect();
    ids.sort();
    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(ids, want, "stats: {stats:?}");
    for s in &stats {
        let memory = s
            .memory
            .as_ref()
            .and_then(|m| m.working_set_bytes.as_ref())
            .map(|v| v.value)
            .unwrap_or(0);
        assert!(
            memory > 0 && memory < 256 << 20,
            "working set of a sleeping busybox: {s:?}"
        );
        assert!(
            s.cpu
                .as_ref()
                .and_then(|c| c.usage_core_nano_seconds.as_ref())
                .is_some(),
            "CPU usage: {s:?}"
        );
    }

    // UpdateContainerResources: containerd hands the shim's Update the new OCI resources,
    // and the container's cgroup in the guest takes them.
    cri.ok(
        "UpdateContainerResources",
        rt.update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: b.clone(),
            linux: Some(api::LinuxContainerResources {
                memory_limit_in_bytes: 48 << 20,
                cpu_period: 100_000,
                cpu_quota: 50_000,
                ..Default::default()
            }),
            ..Default::default()
        }),
    );
    let limits = exec(&["cat", "/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/cpu.max"])
        .expect("ExecSync after the update");
    assert_eq!(
        String::from_utf8_lossy(&limits.stdout),
        "50331648\n50000 100000\n",
        "b's limits after UpdateContainerResources"
    );

    // StopContainer: SIGTERM ends `sleep` at once.
    cri.ok(
        "StopContainer",
        rt.stop_container(api::StopContainerRequest {
            container_id: a.clone(),
            timeout: 30,
        }),
    );
    let stopped = cri.wait_exited(&a, Duration::from_secs(5));
    assert_eq!(
        stopped.exit_code, 143,
        "sleep killed by SIGTERM: {stopped:?}"
    );
    assert_eq!(
        brig_e2e::vmm_processes().len(),
        1,
        "the pod's microVM outlives one container"
    );

    cri.remove_pod(&pod);
    c.assert_clean();
    assert_cgroup_removed(&cgroup);
}

#[test]
fn cri_stop_kills_after_the_grace_period_and_an_oom_kill_reads_oomkilled() {
    let (c, cri, logs) = cri_setup("cri-stop");
    let config = pod_config("pod2", &logs);
    let pod = cri.run_pod(HANDLER, &config);
    let mut rt = cri.runtime.clone();

    // A container that ignores SIGTERM is killed when the grace period is over.
    let stubborn = cri.run_container(
        &pod,
        &config,
        container_config(
            "stubborn",
            IMAGE,
            &[
                "sh",
                "-c",
                "trap '' TERM; echo ready; while :; do sleep 1; done",
            ],
        ),
    );
    wait_log_line(&logs.join("stubborn.log"), "stdout", "ready");
    let started = Instant::now();
    cri.ok(
        "StopContainer",
        rt.stop_container(api::StopContainerRequest {
            container_id: stubborn.clone(),
            timeout: 3,
        }),
    );
    let took = started.elapsed();
    let stopped = cri.wait_exited(&stubborn, Duration::from_secs(5));
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(60),
        "StopContainer took {took:?} with a 3 s grace period"
    );
    assert_eq!(
        stopped.exit_code, 137,
        "SIGKILL after the grace period: {stopped:?}"
    );

    // A container past its memory limit is OOM-killed in the guest; CRI says OOMKilled.
    let mut hog = container_config(
        "hog",
        IMAGE,
        &["sh", "-c", "x=aaaaaaaa; while :; do x=$x$x; done"],
    );
    hog.linux.as_mut().unwrap().resources = Some(api::LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let hog = cri.run_container(&pod, &config, hog);
    let oom = cri.wait_exited(&hog, Duration::from_secs(120));
    assert_eq!(
        (oom.exit_code, oom.reason.as_str()),
        (137, "OOMKilled"),
        "{oom:?}"
    );

    cri.remove_pod(&pod);
    c.assert_clean();
}

#[test]
fn a_pod_whose_shim_was_killed_is_removed_without_leftovers() {
    let (c, cri, logs) = cri_setup("cri-crash");
    let mut config = pod_config("pod3", &logs);
    let cgroup = with_pod_cgroup(&mut config, "pod3");
    let pod = cri.run_pod(HANDLER, &config);
    let ctr = cri.run_container(
        &pod,
        &config,
        container_config("c", IMAGE, &["sleep", "600"]),
    );
    let shims = processes_named("containerd-shim");
    assert_eq!(shims.len(), 1, "one shim per pod");
    assert!(Command::new("kill")
        .args(["-9", &shims[0].to_string()])
        .status()
        .unwrap()
        .success());
    // containerd sees the shim gone: the pod's containers exit.
    let gone = cri.wait_exited(&ctr, Duration::from_secs(60));
    assert_ne!(gone.exit_code, 0, "{gone:?}");
    cri.remove_pod(&pod);
    c.assert_clean();
    assert_cgroup_removed(&cgroup);
}

#[test]
fn a_pod_whose_vmm_was_killed_shows_its_containers_exited_and_is_removed_cleanly() {
    let (c, cri, logs) = cri_setup("cri-vmm");
    let config = pod_config("pod4", &logs);
    let pod = cri.run_pod(HANDLER, &config);
    let ctr = cri.run_container(
        &pod,
        &config,
        container_config("c", IMAGE, &["sleep", "600"]),
    );
    let vmms = brig_e2e::vmm_processes();
    assert_eq!(vmms.len(), 1, "one microVM per pod");
    assert!(Command::new("kill")
        .args(["-9", &vmms[0].to_string()])
        .status()
        .unwrap()
        .success());
    let gone = cri.wait_exited(&ctr, Duration::from_secs(60));
    assert_ne!(gone.exit_code, 0, "{gone:?}");
    let mut rt = cri.runtime.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cri
            .ok(
                "PodSandboxStatus",
                rt.pod_sandbox_status(api::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.clone(),
                    verbose: false,
                }),
            )
            .status
            .unwrap();
        // The sandbox task (the pause container in the guest) is gone with the VM.
        if status.state == api::PodSandboxState::SandboxNotready as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "pod still ready: {status:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    cri.remove_pod(&pod);
    c.assert_clean();
}

#[test]
fn twenty_pod_cycles_leave_nothing_behind() {
    let (c, cri, logs) = cri_setup("cri-cycles");
    let mut config = pod_config("cycle", &logs);
    let cgroup = with_pod_cgroup(&mut config, "cycle");
    let fds_before = brig_e2e::dir_entries(Path::new("/proc/self/fd")).len();
    for n in 0..20 {
        config.metadata.as_mut().unwrap().attempt = n;
        let pod = cri.run_pod(HANDLER, &config);
        let ctr = cri.run_container(
            &pod,
            &config,
            container_config("c", IMAGE, &["sh", "-c", "echo cycle; sleep 600"]),
        );
        let mut rt = cri.runtime.clone();
        let out = cri.ok(
            "ExecSync",
            rt.exec_sync(api::ExecSyncRequest {
                container_id: ctr,
                cmd: vec!["echo".into(), format!("n={n}")],
                timeout: 60,
            }),
        );
        assert_eq!(out.stdout, format!("n={n}\n").into_bytes());
        cri.remove_pod(&pod);
        c.assert_clean();
    }
    assert_cgroup_removed(&cgroup);
    // The CRI client's own descriptors did not grow either (one connection throughout).
    let fds_after = brig_e2e::dir_entries(Path::new("/proc/self/fd")).len();
    assert!(
        fds_after <= fds_before + 2,
        "fds {fds_before} → {fds_after}"
    );
}

#[test]
fn a_pod_keeps_running_across_a_containerd_restart() {
    let mut c = Containerd::start_cri("cri-restart");
    c.import_busybox();
    let logs = c.dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let config = pod_config("pod5", &logs);
    let (pod, ctr) = {
        let cri = Cri::connect(&c.socket);
        let pod = cri.run_pod(HANDLER, &config);
        let ctr = cri.run_container(
            &pod,
            &config,
            container_config("c", IMAGE, &["sleep", "600"]),
        );
        (pod, ctr)
    };
    let shims = processes_named("containerd-shim");
    let vmms = processes_named("brig-vmm");
    c.restart();
    // containerd found the running shim again (its address in the task's bundle): the same
    // shim and microVM serve the pod, and nothing was cleaned up behind it.
    let cri = Cri::connect(&c.socket);
    assert_eq!(processes_named("containerd-shim"), shims);
    assert_eq!(processes_named("brig-vmm"), vmms);
    assert_eq!(
        cri.status(&ctr).state,
        api::ContainerState::ContainerRunning as i32
    );
    let mut rt = cri.runtime.clone();
    let out = cri.ok(
        "ExecSync after the restart",
        rt.exec_sync(api::ExecSyncRequest {
            container_id: ctr.clone(),
            cmd: vec!["echo".into(), "still-here".into()],
            timeout: 60,
        }),
    );
    assert_eq!(out.stdout, b"still-here\n");
    cri.remove_pod(&pod);
    c.assert_clean();
}

#[test]
fn a_pod_under_a_systemd_slice_runs_in_its_scope_and_leaves_nothing() {
    let (c, cri, logs) = cri_setup("cri-slice");
    let mut config = pod_config("pod5", &logs);
    // kubelet's systemd driver makes the pod a slice; CRI then sends the sandbox's
    // cgroupsPath as `brige2e-pod5.slice:cri-containerd:<id>`.
    let slice = Path::new("/sys/fs/cgroup/brige2e.slice/brige2e-pod5.slice");
    std::fs::create_dir_all(slice).unwrap();
    config.linux.as_mut().unwrap().cgroup_parent = "/brige2e.slice/brige2e-pod5.slice".into();
    let pod = cri.run_pod(HANDLER, &config);
    let want = format!("/brige2e.slice/brige2e-pod5.slice/cri-containerd-{pod}.scope");
    let placed: Vec<(&str, String)> = [
        ("shim", processes_named("containerd-shim")),
        ("VMM", brig_e2e::vmm_processes()),
    ]
    .into_iter()
    .map(|(name, pids)| {
        (
            name,
            pids.first().map(|p| cgroup_of(*p)).unwrap_or_default(),
        )
    })
    .collect();
    cri.remove_pod(&pod);
    c.assert_clean();
    let left = brig_e2e::dir_entries(slice)
        .into_iter()
        .filter(|e| slice.join(e).is_dir())
        .collect::<Vec<_>>();
    let _ = std::fs::remove_dir(slice);
    let _ = std::fs::remove_dir("/sys/fs/cgroup/brige2e.slice");
    for (name, cgroup) in placed {
        assert_eq!(cgroup, want, "the {name}'s cgroup");
    }
    assert!(left.is_empty(), "cgroups left in the pod's slice: {left:?}");
}

/// A shell on a terminal: its terminal's name, then the terminal's size after each line it
/// reads, until its input ends; it then exits 3.
const ON_A_TERMINAL: &str = "tty; while read x; do stty size; done; echo done; exit 3";

/// What a user at a terminal of 30x100 does, then one of 40x120: types a line until the
/// shell prints each size; then ^D. All the session showed, and its final status.
fn resize_and_type(session: &mut Session) -> (String, Option<String>) {
    let within = Duration::from_secs(60);
    session.resize(30, 100);
    session.type_until(b"x\n", "30 100", 1, within);
    session.resize(40, 120);
    session.type_until(b"x\n", "40 120", 1, within);
    session.type_in(b"\x04");
    let status = session.finish(within);
    (
        String::from_utf8_lossy(&session.output).into_owned(),
        status,
    )
}

#[test]
fn cri_exec_and_attach_on_a_terminal_follow_the_users_resizes() {
    let (c, cri, logs) = cri_setup("cri-tty");
    let config = pod_config("tty", &logs);
    let pod = cri.run_pod(HANDLER, &config);
    let mut shell = container_config("shell", IMAGE, &["sh", "-c", ON_A_TERMINAL]);
    shell.tty = true;
    shell.stdin = true;
    let shell = cri.run_container(&pod, &config, shell);

    // kubectl exec -it: a process of its own on a terminal of its own (ResizePty of an exec).
    let mut exec = cri.exec_session(&shell, &["sh", "-c", ON_A_TERMINAL]);
    let (seen, status) = resize_and_type(&mut exec);
    assert!(seen.contains("/dev/pts/"), "exec: no terminal: {seen:?}");
    assert!(seen.contains("done"), "exec: {seen:?}");
    let status = status.unwrap_or_default();
    assert!(
        status.contains("NonZeroExitCode") && status.contains("\"message\":\"3\""),
        "exec: the exit code 3 is not in the final status {status:?}"
    );

    // kubectl attach -it: the container's own process (ResizePty of the task).
    let mut attach = cri.attach_session(&shell);
    let (seen, _) = resize_and_type(&mut attach);
    assert!(seen.contains("done"), "attach: {seen:?}");
    let exited = cri.wait_exited(&shell, Duration::from_secs(60));
    assert_eq!(exited.exit_code, 3, "{exited:?}");

    cri.remove_pod(&pod);
    c.assert_clean();
}

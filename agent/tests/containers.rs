//! Container lifecycle against the real `brig-agent` binary run by hand (not PID 1) as root
//! on this host, with a busybox rootfs and stdio on Unix sockets (the hybrid-vsock naming).
//! Skipped (with a note) when not root or without /bin/busybox.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use brig_protocols::agent::*;
use brig_protocols::agent_ttrpc::AgentClient;
use ttrpc::Code;

struct Agent {
    child: Child,
    dir: PathBuf,
    client: AgentClient,
    next_port: u32,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

fn usable() -> bool {
    let ok = nix::unistd::geteuid().is_root() && Path::new("/bin/busybox").exists();
    if !ok {
        eprintln!("skipping: needs root and /bin/busybox");
    }
    ok
}

impl Agent {
    fn start(name: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!("brig-ctr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = format!("unix://{}", dir.join("agent.sock").display());
        let child = Command::new(env!("CARGO_BIN_EXE_brig-agent"))
            .args(["--listen", &socket, "--log", "info", "--self-test-uds"])
            .arg(dir.join("vsock"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("agent.sock").exists() {
            assert!(Instant::now() < deadline, "agent never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        let client = AgentClient::new(ttrpc::Client::connect(&socket).unwrap());
        make_rootfs(&dir.join("rootfs"));
        Agent {
            child,
            dir,
            client,
            next_port: 5000,
        }
    }

    /// Listens on a fresh "host port"; the thread returns what the agent sent until EOF.
    fn output_port(&mut self) -> (u32, JoinHandle<Vec<u8>>) {
        self.next_port += 1;
        let port = self.next_port;
        let listener =
            UnixListener::bind(format!("{}_{port}", self.dir.join("vsock").display())).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut out = Vec::new();
            stream.read_to_end(&mut out).unwrap();
            out
        });
        (port, handle)
    }

    fn rootfs(&self) -> String {
        self.dir.join("rootfs").display().to_string()
    }

    fn create(
        &mut self,
        id: &str,
        spec: serde_json::Value,
    ) -> (
        ttrpc::Result<CreateContainerResponse>,
        JoinHandle<Vec<u8>>,
        JoinHandle<Vec<u8>>,
    ) {
        let (out_port, out) = self.output_port();
        let (err_port, err) = self.output_port();
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec.to_string(),
            rootfs: self.rootfs(),
            stdio: Some(StdioPorts {
                stdin: 0,
                stdout: out_port,
                stderr: err_port,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        (self.client.create_container(ctx(), &req), out, err)
    }

    fn start_container(&self, id: &str) {
        let req = StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.start_container(ctx(), &req).unwrap();
    }

    fn wait(&self, id: &str, exec_id: &str) -> WaitProcessResponse {
        let req = WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &req).unwrap()
    }

    fn remove(&self, id: &str) {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.client.remove_container(ctx(), &req).unwrap();
    }

    /// Runs a container to its end: (exit status, stdout, stderr).
    fn run(&mut self, id: &str, spec: serde_json::Value) -> (i32, String, String) {
        let (created, out, err) = self.create(id, spec);
        created.unwrap();
        self.start_container(id);
        let exit = self.wait(id, "");
        let out = String::from_utf8(out.join().unwrap()).unwrap();
        let err = String::from_utf8(err.join().unwrap()).unwrap();
        self.remove(id);
        (exit.exit_status, out, err)
    }
}

fn make_rootfs(root: &Path) {
    for dir in ["bin", "proc", "dev", "sys", "tmp", "etc", "root", "work"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    // Every applet as a symlink, made here rather than by `busybox --install` in a chroot
    // (which has no /proc there and failed once in CI).
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    assert!(list.status.success(), "busybox --list failed");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("bin/not-executable"), "#!/bin/sh\n").unwrap();
}

fn spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "args": args,
            "env": ["PATH=/bin", "GREETING=hello"],
            "cwd": "/",
            "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    })
}

#[test]
fn container_lifecycle_on_this_host() {
    if !usable() {
        return;
    }
    let mut agent = Agent::start("lifecycle");

    // Exit codes, stdout and stderr apart.
    let (status, out, err) = agent.run("ok", spec(&["sh", "-c", "echo out; echo err >&2"]));
    assert_eq!((status, out.as_str(), err.as_str()), (0, "out\n", "err\n"));
    let (status, _, _) = agent.run("three", spec(&["sh", "-c", "exit 3"]));
    assert_eq!(status, 3);

    // The command is PID 1; env, cwd, uid and hostname are honoured.
    let mut s = spec(&[
        "sh",
        "-c",
        "echo $$ $GREETING $(pwd) $(id -u):$(id -g) $(hostname)",
    ]);
    s["process"]["cwd"] = "/tmp".into();
    s["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    let (status, out, err) = agent.run("who", s);
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, "1 hello /tmp 1000:1000 box\n");

    // A missing command fails at create, quickly, with runc's message.
    let started = Instant::now();
    let (created, _out, _err) = agent.create("missing", spec(&["nope"]));
    let err = created.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    match err {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), Code::NOT_FOUND);
            assert_eq!(
                status.message(),
                "exec: \"nope\": executable file not found in $PATH"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let (created, _out, _err) = agent.create("noexec", spec(&["/bin/not-executable"]));
    match created.unwrap_err() {
        ttrpc::Error::RpcStatus(status) => assert_eq!(status.code(), Code::PERMISSION_DENIED),
        other => panic!("unexpected {other:?}"),
    }
    // A bad spec.
    let (created, _out, _err) = agent.create("bad", serde_json::json!({"process": 7}));
    match created.unwrap_err() {
        ttrpc::Error::RpcStatus(status) => assert_eq!(status.code(), Code::INVALID_ARGUMENT),
        other => panic!("unexpected {other:?}"),
    }

    // Seccomp: a profile denying mkdir makes mkdir fail with EPERM.
    let mut s = spec(&["sh", "-c", "mkdir /tmp/x; echo rc=$?"]);
    s["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (status, out, err) = agent.run("seccomp", s);
    assert_eq!(status, 0);
    assert_eq!(out, "rc=1\n");
    assert!(err.contains("Operation not permitted"), "{err}");

    // Exec into a running container, then kill it: 137.
    let (created, out, _err) = agent.create("long", spec(&["sleep", "1000"]));
    created.unwrap();
    agent.start_container("long");
    let (out_port, exec_out) = agent.output_port();
    let process = serde_json::json!({
        "args": ["sh", "-c", "echo exec $$ $(cat /proc/1/cmdline | tr '\\0' ' ')"],
        "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
    });
    let req = ExecProcessRequest {
        container_id: "long".into(),
        exec_id: "e1".into(),
        process_json: process.to_string(),
        stdio: Some(StdioPorts {
            stdout: out_port,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    agent.client.exec_process(ctx(), &req).unwrap();
    assert_eq!(agent.wait("long", "e1").exit_status, 0);
    let exec_out = String::from_utf8(exec_out.join().unwrap()).unwrap();
    assert!(exec_out.starts_with("exec "), "{exec_out}");
    assert!(exec_out.ends_with(" sleep 1000\n"), "{exec_out}");
    let mut missing = req.clone();
    missing.exec_id = "e2".into();
    missing.process_json =
        serde_json::json!({"args": ["nope"], "cwd": "/", "user": {"uid": 0, "gid": 0}}).to_string();
    missing.stdio = Some(StdioPorts::default()).into();
    match agent.client.exec_process(ctx(), &missing).unwrap_err() {
        ttrpc::Error::RpcStatus(status) => assert_eq!(status.code(), Code::NOT_FOUND),
        other => panic!("unexpected {other:?}"),
    }
    let list = agent
        .client
        .list_processes(
            ctx(),
            &ListProcessesRequest {
                container_id: "long".into(),
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        list.processes.iter().any(|p| p.cmdline == "sleep 1000"),
        "{list:?}"
    );
    agent
        .client
        .signal_process(
            ctx(),
            &SignalProcessRequest {
                container_id: "long".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .unwrap();
    let exit = agent.wait("long", "");
    assert_eq!((exit.exit_status, exit.signal), (137, 9));
    out.join().unwrap();
    agent.remove("long");

    // Removing an unknown container.
    let err = agent
        .client
        .remove_container(
            ctx(),
            &RemoveContainerRequest {
                container_id: "long".into(),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, ttrpc::Error::RpcStatus(s) if s.code() == Code::NOT_FOUND));
}

#[test]
fn stdin_and_terminal() {
    if !usable() {
        return;
    }
    let mut agent = Agent::start("stdio");
    let connect_input = |agent: &mut Agent| {
        agent.next_port += 1;
        let port = agent.next_port;
        let listener =
            UnixListener::bind(format!("{}_{port}", agent.dir.join("vsock").display())).unwrap();
        let handle = std::thread::spawn(move || {
            use std::io::Write;
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"from host\n").unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            // Keep the connection until the agent is done with it.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
        });
        (port, handle)
    };

    // Pipes: host EOF on stdin ends the process's stdin.
    let (in_port, input) = connect_input(&mut agent);
    let (out_port, out) = agent.output_port();
    let req = CreateContainerRequest {
        container_id: "cat".into(),
        oci_spec_json: spec(&["cat"]).to_string(),
        rootfs: agent.rootfs(),
        stdio: Some(StdioPorts {
            stdin: in_port,
            stdout: out_port,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    agent.client.create_container(ctx(), &req).unwrap();
    agent.start_container("cat");
    assert_eq!(agent.wait("cat", "").exit_status, 0);
    assert_eq!(out.join().unwrap(), b"from host\n");
    input.join().unwrap();
    agent.remove("cat");

    // A terminal: stdin and stdout are a tty, output comes on the stdout stream.
    let (in_port, input) = connect_input(&mut agent);
    let (out_port, out) = agent.output_port();
    let mut s = spec(&[
        "sh",
        "-c",
        "test -t 0 && test -t 1 && echo is-a-tty; echo tty=$(tty); echo size=$(stty size); \
         read line; echo got $line",
    ]);
    s["process"]["terminal"] = true.into();
    let req = CreateContainerRequest {
        container_id: "tty".into(),
        oci_spec_json: s.to_string(),
        rootfs: agent.rootfs(),
        stdio: Some(StdioPorts {
            stdin: in_port,
            stdout: out_port,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    agent.client.create_container(ctx(), &req).unwrap();
    agent
        .client
        .resize_tty(
            ctx(),
            &ResizeTtyRequest {
                container_id: "tty".into(),
                rows: 40,
                cols: 100,
                ..Default::default()
            },
        )
        .unwrap();
    agent.start_container("tty");
    assert_eq!(agent.wait("tty", "").exit_status, 0);
    let out = String::from_utf8_lossy(&out.join().unwrap()).to_string();
    assert!(out.contains("is-a-tty"), "{out:?}");
    // The pty comes from the container's own devpts (like runc), sized by ResizeTty.
    assert!(out.contains("tty=/dev/pts/0"), "{out:?}");
    assert!(out.contains("size=40 100"), "{out:?}");
    assert!(out.contains("got from host"), "{out:?}");
    input.join().unwrap();
    agent.remove("tty");
}

/// `linux.namespaces` with `user` and a mapping of container 0..65536 to 100000..165536.
fn userns_spec(args: &[&str]) -> serde_json::Value {
    let mut s = spec(args);
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"type": "user"}));
    let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    s["linux"]["uidMappings"] = map.clone();
    s["linux"]["gidMappings"] = map;
    s
}

fn uid_map_line(container: u32, host: u32, size: u32) -> String {
    // The kernel's format: "%10u %10u %10u\n".
    format!("{container:>10} {host:>10} {size:>10}\n")
}

#[test]
fn user_namespace_maps_root_to_an_unprivileged_range() {
    if !usable() {
        return;
    }
    let mut agent = Agent::start("userns");
    let map = uid_map_line(0, 100000, 65536);

    // Root inside, nobody's files outside, no power over the real root's directories.
    let (status, out, err) = agent.run(
        "userns",
        userns_spec(&[
            "sh",
            "-c",
            "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; stat -c %u /bin/busybox; \
             hostname; touch /root/x && echo WROTE; exit 7",
        ]),
    );
    assert_eq!(status, 7, "{err}");
    assert_eq!(out, format!("0\n0\n{map}{map}65534\nbox\n"));
    assert!(err.contains("Permission denied"), "{err}");
    assert!(!agent.dir.join("rootfs/root/x").exists());

    // Everything else still works inside: sysfs without a network namespace (the guest's is
    // bound), mqueue, shm, cgroup, devpts with gid=5, device nodes (bound), a read-only
    // volume, a read-only root, rlimits (set from the agent; the hard limit is the agent's,
    // as this host's root may lack CAP_SYS_RESOURCE to raise it), seccomp.
    let volume = agent.dir.join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("given"), "from host\n").unwrap();
    let mut s = userns_spec(&[
        "sh",
        "-c",
        "cat /work/given; echo x > /dev/null && echo null; head -c 3 /dev/zero | wc -c; \
         ulimit -n; ulimit -Hn; test -d /sys/kernel && echo sys; test -d /dev/mqueue && echo mq; \
         touch /work/no 2>/dev/null || echo ro-volume; touch /x 2>/dev/null || echo ro-root; \
         mkdir /dev/shm/d; echo mkdir=$?",
    ]);
    let mounts = s["mounts"].as_array_mut().unwrap();
    mounts[2]["options"]
        .as_array_mut()
        .unwrap()
        .push("gid=5".into());
    mounts.extend([
        serde_json::json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        serde_json::json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"]}),
        serde_json::json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
            "options": ["nosuid", "noexec", "nodev", "ro"]}),
        serde_json::json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
        serde_json::json!({"destination": "/work", "type": "bind", "source": volume,
            "options": ["rbind", "ro"]}),
    ]);
    s["root"]["readonly"] = true.into();
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    s["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "soft": 100, "hard": hard}]);
    s["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let (status, out, err) = agent.run("userns-mounts", s);
    assert_eq!(status, 0, "{err}");
    assert_eq!(
        out,
        format!("from host\nnull\n3\n100\n{hard}\nsys\nmq\nro-volume\nro-root\nmkdir=1\n"),
        "{err}"
    );

    // A mapped non-root user, with a terminal and capabilities dropped.
    let mut s = userns_spec(&["sh", "-c", "tty; id -u; id -g; exec sleep 1000"]);
    s["process"]["terminal"] = true.into();
    s["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    s["process"]["capabilities"] =
        serde_json::json!({"bounding": [], "effective": [], "permitted": []});
    let (created, out, _err) = agent.create("userns-tty", s);
    created.unwrap();
    agent.start_container("userns-tty");

    // Exec joins the container's user namespace.
    let (out_port, exec_out) = agent.output_port();
    let req = ExecProcessRequest {
        container_id: "userns-tty".into(),
        exec_id: "e1".into(),
        process_json: serde_json::json!({
            "args": ["sh", "-c", "id -u; cat /proc/self/uid_map; exit 4"],
            "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}
        })
        .to_string(),
        stdio: Some(StdioPorts {
            stdout: out_port,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    agent.client.exec_process(ctx(), &req).unwrap();
    assert_eq!(agent.wait("userns-tty", "e1").exit_status, 4);
    assert_eq!(
        String::from_utf8(exec_out.join().unwrap()).unwrap(),
        format!("0\n{map}")
    );
    // An exec as a user outside the mappings is refused before it starts.
    let mut unmapped = req.clone();
    unmapped.exec_id = "e2".into();
    unmapped.process_json = serde_json::json!({
        "args": ["true"], "cwd": "/", "user": {"uid": 70000, "gid": 0}
    })
    .to_string();
    unmapped.stdio = Some(StdioPorts::default()).into();
    match agent.client.exec_process(ctx(), &unmapped).unwrap_err() {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), Code::INVALID_ARGUMENT);
            assert!(
                status.message().contains("uid 70000 is not mapped"),
                "{status:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    agent
        .client
        .signal_process(
            ctx(),
            &SignalProcessRequest {
                container_id: "userns-tty".into(),
                signal: 9,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(agent.wait("userns-tty", "").exit_status, 137);
    let tty_out = String::from_utf8_lossy(&out.join().unwrap()).replace('\r', "");
    assert_eq!(tty_out, "/dev/pts/0\n1000\n1000\n");
    agent.remove("userns-tty");

    // A user namespace without mappings is refused with the field to fix.
    let mut s = userns_spec(&["true"]);
    s["linux"]["uidMappings"] = serde_json::json!([]);
    let (created, _out, _err) = agent.create("nomap", s);
    match created.unwrap_err() {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), Code::INVALID_ARGUMENT);
            assert!(
                status.message().contains("linux.uidMappings is empty"),
                "{status:?}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

//! containerd 1.6 (Debian's) driving `containerd-shim-brig-v2` through `ctr`, as a user who
//! picks the runtime with `--runtime io.containerd.brig.v2` does. Each test starts its own
//! containerd on a tmpfs root, imports a busybox image built here, and checks what `ctr`
//! shows and what is left on the host afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use brig_e2e::{busybox_rootfs, dir_entries, env_path, processes_named};
use sha2::{Digest, Sha256};

const RUNTIME: &str = "io.containerd.brig.v2";
const IMAGE: &str = "docker.io/brig/busybox:e2e";
const NAMESPACE: &str = "brig-e2e";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// An OCI image archive (`ctr images import` reads it) of one uncompressed layer: `rootfs`.
fn image_archive(dir: &Path, rootfs: &Path) -> PathBuf {
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = dir.join("layer.tar");
    let tar = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(rootfs)
        .args(["-cf"])
        .arg(&layer)
        .arg(".")
        .status()
        .unwrap();
    assert!(tar.success());
    let layer_bytes = std::fs::read(&layer).unwrap();
    let layer_digest = sha256_hex(&layer_bytes);
    std::fs::write(blobs.join(&layer_digest), &layer_bytes).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
    );
    let config_digest = sha256_hex(config.as_bytes());
    std::fs::write(blobs.join(&config_digest), &config).unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_digest}","size":{}}}]}}"#,
        config.len(),
        layer_bytes.len()
    );
    let manifest_digest = sha256_hex(manifest.as_bytes());
    std::fs::write(blobs.join(&manifest_digest), &manifest).unwrap();
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{},"annotations":{{"io.containerd.image.name":"{IMAGE}","org.opencontainers.image.ref.name":"e2e"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join("busybox-oci.tar");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .args(["oci-layout", "index.json", "blobs"])
        .status()
        .unwrap();
    assert!(tar.success());
    archive
}

/// A containerd of one test: its own root on a tmpfs, socket, and Brig state root.
struct Containerd {
    dir: PathBuf,
    socket: PathBuf,
    brig_root: PathBuf,
    child: Child,
}

impl Containerd {
    fn start(test: &str) -> Self {
        let dir = PathBuf::from(format!(
            "/var/tmp/brig-e2e-containerd-{test}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // overlayfs (containerd's snapshotter) needs a real filesystem under it, not L1's root.
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mounting a tmpfs on {}", dir.display());
        let socket = dir.join("containerd.sock");
        let brig_root = PathBuf::from("/run/brig-e2e").join(format!("containerd-{test}"));
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n",
                dir.display(),
                socket.display()
            ),
        )
        .unwrap();
        // containerd finds `containerd-shim-brig-v2` for io.containerd.brig.v2 on its PATH;
        // the shim reads BRIG_* (kernel, initramfs, VMM, state root) from the environment.
        let shim = env_path("BRIG_SHIM");
        let path = format!(
            "{}:{}",
            shim.parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("BRIG_ROOT", &brig_root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd (Debian package containerd)");
        let me = Self {
            dir,
            socket,
            brig_root,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while me.ctr(&["version"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer: {}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        me
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().unwrap()
    }

    /// `ctr ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {:?}\nstdout: {}\nstderr: {}\ncontainerd: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.log()
        );
        text(&out.stdout)
    }

    fn import_busybox(&self) {
        let rootfs = busybox_rootfs(&self.dir.join("fixture"));
        let archive = image_archive(&self.dir.join("fixture"), &rootfs);
        self.ok(&["images", "import", archive.to_str().unwrap()]);
        let images = self.ok(&["images", "ls", "-q"]);
        assert!(
            images.lines().any(|l| l == IMAGE),
            "imported images: {images}"
        );
    }

    /// What a pod leaves on the host once containerd deleted it: nothing.
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // (the kernel cuts command names to 15 characters)
            let shims = processes_named("containerd-shim");
            let vmms = processes_named("brig-vmm");
            let sandboxes = dir_entries(
                &self
                    .brig_root
                    .join("containerd")
                    .join(NAMESPACE)
                    .join("sandboxes"),
            );
            let containers = dir_entries(
                &self
                    .brig_root
                    .join("containerd")
                    .join(NAMESPACE)
                    .join("containers"),
            );
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let ours: Vec<&str> = mounts
                .lines()
                .filter(|l| {
                    l.contains(self.dir.join("state").to_str().unwrap())
                        || l.contains(self.brig_root.to_str().unwrap())
                })
                .collect();
            if shims.is_empty()
                && vmms.is_empty()
                && sandboxes.is_empty()
                && containers.is_empty()
                && ours.is_empty()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: shims {shims:?}, VMMs {vmms:?}, sandboxes {sandboxes:?}, containers {containers:?}, mounts {ours:#?}\ncontainerd: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in processes_named("containerd-shim")
            .into_iter()
            .chain(processes_named("brig-vmm"))
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        IMAGE,
        "task1",
        "sleep",
        "600",
    ]);
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
    c.ok(&["task", "resume", "task1"]);
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

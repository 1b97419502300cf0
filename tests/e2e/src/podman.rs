//! podman for the end-to-end tests and benchmarks: storage of its own per test, Brig (or
//! another OCI runtime) as its runtime.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::{busybox_rootfs, env_path, stdout_of};

/// A podman with storage of its own (on L1's tmpfs: overlays cannot stack on its root) and
/// Brig as the runtime; Brig's state under `brig_root`, its default.
pub struct Podman {
    /// The OCI runtime podman is given (`--runtime`).
    pub runtime: PathBuf,
    pub storage: PathBuf,
    pub brig_root: PathBuf,
}

impl Podman {
    pub fn new(test: &str) -> Self {
        let storage = std::env::temp_dir().join(format!("brig-e2e-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&storage);
        std::fs::create_dir_all(&storage).unwrap();
        Self {
            runtime: env_path("BRIG_BIN"),
            storage,
            // Brig's default root: podman's `--runtime-flag root=…` does not reach the
            // runtime calls of the cleanup process conmon starts (podman 4.3), nor does
            // our environment.
            brig_root: PathBuf::from("/run/brig"),
        }
    }

    /// `podman` with our storage and runtime, then `args`.
    pub fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv = vec![
            "podman".to_string(),
            "--root".into(),
            self.storage.join("root").display().to_string(),
            "--runroot".into(),
            self.storage.join("run").display().to_string(),
        ];
        for flag in [
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ] {
            argv.push(flag.into());
        }
        argv.push("--runtime".into());
        argv.push(self.runtime.display().to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let argv = self.argv(args);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `podman ARGS` that must succeed: its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        stdout_of(self.run(args), &format!("podman {args:?}"))
    }

    /// `podman run -d --network none --name NAME IMAGE COMMAND…`, which must succeed.
    pub fn detached(&self, name: &str, command: &[&str]) {
        let run = ["run", "-d", "--network", "none", "--name", name, IMAGE];
        self.ok(&[&run[..], command].concat());
    }

    /// A busybox image, imported from a tarball of its root filesystem.
    pub fn import_busybox(&self) {
        let rootfs = busybox_rootfs(&self.storage.join("image"));
        let tar = self.storage.join("busybox.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success(), "tar of the busybox rootfs");
        self.ok(&["import", tar.to_str().unwrap(), IMAGE]);
    }

    pub fn exit_code(&self, name: &str) -> String {
        self.ok(&["inspect", "--format", "{{.State.ExitCode}}", name])
            .trim()
            .to_string()
    }
}

pub const IMAGE: &str = "localhost/busybox:brig";

//! A containerd of one test (Debian's 1.6): its own root on a tmpfs, socket, and Brig state
//! root, with `containerd-shim-brig-v2` on its PATH. Either as `ctr` users meet it (CRI off),
//! or as kubelet does (CRI on, Brig behind the runtime handler `sandboxed`, configured with
//! the snippet users copy from `configs/containerd.toml`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{busybox_rootfs, dir_entries, env_path, processes_named, text};

/// The containerd runtime name of Brig's shim.
pub const RUNTIME: &str = "io.containerd.brig.v2";
/// The busybox image tests import.
pub const IMAGE: &str = "docker.io/brig/busybox:e2e";
/// The pod sandbox ("pause") image of the CRI tests: busybox sleeping until killed.
pub const PAUSE_IMAGE: &str = "docker.io/brig/pause:e2e";
/// What users put in containerd's config for Brig (the test uses it as it is, with its own
/// brig.toml as the ConfigPath).
const CONFIG_SNIPPET: &str = include_str!("../../../configs/containerd.toml");

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// An OCI image archive (`ctr images import` reads it) named `name`, of one uncompressed
/// layer: `rootfs`; `config` is the image config's `config` object (JSON).
fn image_archive(dir: &Path, rootfs: &Path, name: &str, config: &str) -> PathBuf {
    let layout = dir.join("oci");
    let _ = std::fs::remove_dir_all(&layout);
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
        r#"{{"architecture":"amd64","os":"linux","config":{config},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_digest}"]}}}}"#
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
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_digest}","size":{},"annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"e2e"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = dir.join(format!("{}.tar", sha256_hex(name.as_bytes())));
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

/// Where Debian's containernetworking-plugins are.
pub const CNI_BIN: &str = "/usr/lib/cni";

/// A CNI bridge network as a node's would be: bridge + host-local IPAM (+ portmap).
pub struct CniNetwork {
    /// Network and bridge name.
    pub name: String,
    /// IPv4 subnet, e.g. "10.88.7.0/24"; the bridge (gateway) has its .1.
    pub subnet: String,
    /// MTU of the pod interfaces.
    pub mtu: u32,
    /// An IPv6 subnet too (dual stack), e.g. "fd00:88:7::/64"; the bridge has its ::1.
    pub subnet6: Option<String>,
}

impl CniNetwork {
    /// The gateway: the bridge's address, which is the host's on this network.
    pub fn gateway(&self) -> String {
        let base = self.subnet.split('/').next().unwrap();
        let mut octets: Vec<&str> = base.split('.').collect();
        octets[3] = "1";
        octets.join(".")
    }

    fn conflist(&self) -> String {
        let (v6_range, v6_route) = match &self.subnet6 {
            Some(s) => (
                format!(r#",[{{"subnet":"{s}"}}]"#),
                r#",{"dst":"::/0"}"#.to_string(),
            ),
            None => (String::new(), String::new()),
        };
        format!(
            r#"{{"cniVersion":"1.0.0","name":"{0}","plugins":[{{"type":"bridge","bridge":"{0}","isGateway":true,"ipMasq":true,"mtu":{2},"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{1}"}}]{3}],"routes":[{{"dst":"0.0.0.0/0"}}{4}]}}}},{{"type":"portmap","capabilities":{{"portMappings":true}}}}]}}"#,
            self.name, self.subnet, self.mtu, v6_range, v6_route
        )
    }

    /// Interfaces, netns files and IP allocations a removed pod may have left.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let links = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        for line in text(&links.stdout).lines() {
            if line.contains(&format!("master {}", self.name)) {
                left.push(format!("veth on the bridge: {line}"));
            }
        }
        let ips = Path::new("/var/lib/cni/networks").join(&self.name);
        for ip in dir_entries(&ips) {
            // host-local's own bookkeeping: its lock and the last address of each range.
            if ip != "lock" && !ip.starts_with("last_reserved_ip.") {
                left.push(format!("IP allocation {ip}"));
            }
        }
        for ns in dir_entries(Path::new("/var/run/netns")) {
            if ns.starts_with("cni-") {
                left.push(format!("netns {ns}"));
            }
        }
        left
    }
}

/// A containerd of one test.
pub struct Containerd {
    /// Its directory (a tmpfs): root, state, socket, logs.
    pub dir: PathBuf,
    /// Its gRPC socket (CRI too, when on).
    pub socket: PathBuf,
    /// Brig's state root for it.
    pub brig_root: PathBuf,
    /// The containerd namespace the tests use (`k8s.io` with CRI).
    pub namespace: String,
    child: Child,
    config: PathBuf,
    cri: bool,
}

impl Containerd {
    /// containerd as `ctr` users meet it: CRI off, Brig's state root from BRIG_ROOT.
    pub fn start(test: &str) -> Self {
        Self::launch(test, false, None)
    }

    /// containerd as kubelet meets it: CRI on, with `configs/containerd.toml` (runtime handler
    /// `sandboxed`) whose ConfigPath names a brig.toml of the test that sets the state root.
    /// The pause image is imported already. There is no CNI: pods use the host's network.
    pub fn start_cri(test: &str) -> Self {
        Self::start_cri_with(test, None)
    }

    /// containerd with CRI whose pods get their network from CNI, as a cluster's nodes do:
    /// Debian's CNI plugins (bridge, host-local, portmap) on `network`.
    pub fn start_cri_cni(test: &str, network: &CniNetwork) -> Self {
        Self::start_cri_with(test, Some(network))
    }

    fn start_cri_with(test: &str, network: Option<&CniNetwork>) -> Self {
        let me = Self::launch(test, true, network);
        me.import(
            PAUSE_IMAGE,
            r#"{"Env":["PATH=/bin"],"Entrypoint":["/bin/sleep","2147483647"]}"#,
        );
        me
    }

    fn launch(test: &str, cri: bool, network: Option<&CniNetwork>) -> Self {
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
        let mut toml = format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n{2}\
             [grpc]\n  address = \"{1}\"\n[ttrpc]\n  address = \"{1}.ttrpc\"\n",
            dir.display(),
            socket.display(),
            if cri {
                ""
            } else {
                "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n"
            }
        );
        if cri {
            let brig_toml = dir.join("brig.toml");
            std::fs::write(&brig_toml, format!("root = \"{}\"\n", brig_root.display())).unwrap();
            for d in ["cni-conf", "cni-bin"] {
                std::fs::create_dir_all(dir.join(d)).unwrap();
            }
            let bin_dir = match network {
                Some(net) => {
                    std::fs::write(dir.join("cni-conf/10-e2e.conflist"), net.conflist()).unwrap();
                    PathBuf::from(CNI_BIN)
                }
                None => dir.join("cni-bin"),
            };
            toml.push_str(&format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  \
                 stream_server_address = \"127.0.0.1\"\n  stream_server_port = \"0\"\n  \
                 restrict_oom_score_adj = true\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  conf_dir = \"{0}/cni-conf\"\n  \
                 bin_dir = \"{1}\"\n",
                dir.display(),
                bin_dir.display()
            ));
            let snippet = CONFIG_SNIPPET
                .lines()
                .filter(|l| l.trim() != "version = 2")
                .map(|l| {
                    if l.trim_start().starts_with("ConfigPath") {
                        format!("    ConfigPath = \"{}\"", brig_toml.display())
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            assert!(
                snippet.contains("ConfigPath = \"/var/tmp"),
                "configs/containerd.toml has no ConfigPath option: {snippet}"
            );
            toml.push_str(&snippet);
            toml.push('\n');
        }
        std::fs::write(&config, toml).unwrap();
        let child = spawn(&dir, &config, cri, &brig_root);
        let me = Self {
            dir,
            socket,
            brig_root,
            namespace: if cri { "k8s.io" } else { "brig-e2e" }.to_string(),
            child,
            config,
            cri,
        };
        me.wait_ready();
        me
    }

    /// Stop containerd (SIGTERM, as systemd does) and start it again on the same state, with
    /// the pods' shims left running.
    pub fn restart(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        self.child = spawn(&self.dir, &self.config, self.cri, &self.brig_root);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ctr(&["version"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        if self.cri {
            let plugins = self.ok(&["plugins", "ls"]);
            assert!(
                plugins.lines().any(|l| l.contains("io.containerd.grpc.v1")
                    && l.contains(" cri ")
                    && l.trim_end().ends_with("ok")),
                "containerd's CRI plugin did not load: {plugins}\ncontainerd: {}",
                self.log()
            );
        }
    }

    /// What containerd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr ARGS` against this containerd, in the test namespace.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// `ctr ARGS`, run.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().unwrap()
    }

    /// `ctr ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
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

    /// Import the busybox image as [`IMAGE`].
    pub fn import_busybox(&self) {
        self.import(IMAGE, r#"{"Env":["PATH=/bin"],"Cmd":["sh"]}"#);
    }

    /// Import busybox as the image `name` with the image config `config`.
    fn import(&self, name: &str, config: &str) {
        let fixture = self.dir.join("fixture");
        let rootfs = busybox_rootfs(&fixture);
        let archive = image_archive(&fixture, &rootfs, name, config);
        self.ok(&["images", "import", archive.to_str().unwrap()]);
        let images = self.ok(&["images", "ls", "-q"]);
        assert!(
            images.lines().any(|l| l == name),
            "imported images: {images}"
        );
    }

    /// Brig's state directory of this containerd's namespace.
    pub fn brig_state(&self) -> PathBuf {
        self.brig_root.join("containerd").join(&self.namespace)
    }

    /// What a pod leaves on the host once containerd deleted it: nothing.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // (the kernel cuts command names to 15 characters)
            let shims = processes_named("containerd-shim");
            let vmms = processes_named("brig-vmm");
            let sandboxes = dir_entries(&self.brig_state().join("sandboxes"));
            let containers = dir_entries(&self.brig_state().join("containers"));
            let links = dir_entries(&self.brig_state().join("v"));
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
                && links.is_empty()
                && ours.is_empty()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: shims {shims:?}, VMMs {vmms:?}, sandboxes {sandboxes:?}, containers {containers:?}, vsock links {links:?}, mounts {ours:#?}\ncontainerd: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// containerd on `config`, logging to `dir/containerd.log` (appended).
fn spawn(dir: &Path, config: &Path, cri: bool, brig_root: &Path) -> Child {
    // containerd finds `containerd-shim-brig-v2` for io.containerd.brig.v2 on its PATH;
    // the shim reads BRIG_* (kernel, initramfs, VMM) from the environment, and the state root
    // from BRIG_ROOT (ctr) or the runtime options' brig.toml (CRI).
    let shim = env_path("BRIG_SHIM");
    let path = format!(
        "{}:{}",
        shim.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    let mut command = Command::new("containerd");
    command
        .arg("--config")
        .arg(config)
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if cri {
        command.env_remove("BRIG_ROOT");
    } else {
        command.env("BRIG_ROOT", brig_root);
    }
    command
        .spawn()
        .expect("containerd (Debian package containerd)")
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

//! A sandbox: one microVM (a `brig-vmm` process) with the agent answering inside.
//!
//! Everything a sandbox owns lives in `<root>/sandboxes/<id>/` (the VMM's vsock socket, the
//! console log, the VMM's own log, the share, and `sandbox.json`, the record that lets any
//! process find the sandbox again with [`Sandbox::open`]) and is removed when the sandbox
//! ends, however it ends.
//!
//! A VMM lives as long as its sandbox, not as long as the process that started it: the
//! `Sandbox` value that started it stops it when dropped, and otherwise it runs until someone
//! stops it (the shim's `delete`, `brig rm`). Only a caller that asks for it
//! ([`SandboxSpec::tie_to_owner`], the foreground `brig run`) has the kernel kill the VMM
//! when the caller dies.

use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::agent::{AgentClient, AgentError};
use crate::config::RuntimeConfig;
use crate::guest_text;
use crate::host::{self, HostError, KvmKind};
use crate::share::{self, SHARE_TAG};
use crate::state::{self, Layout, ProcessRef, StateError};

/// The order (2^N pages) of the blocks a guest reports free: 5 is 128 KiB.
pub const FREE_PAGE_REPORTING_ORDER: u32 = 5;

/// The guest kernel command line (brig-vmm appends its device declarations).
pub const DEFAULT_GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule quiet";

/// How long the VMM gets to exit after the guest was asked to power off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Lines of the guest console quoted in boot errors.
const CONSOLE_TAIL_LINES: usize = 30;
/// Guest memory kept free on top of the containers' memory limits (kernel, agent, caches).
pub const GUEST_OVERHEAD_MIB: u64 = 128;
/// The most vCPUs a sandbox is given for its containers' CPU limits.
const MAX_CPUS: u8 = 32;
/// The VMM's descriptor of the pod's TAP (`brig-vmm --net fd=3,…`).
const NET_FD: i32 = 3;
/// How long [`Sandbox::open`] waits for the agent's answer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What to boot.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Sandbox ID: names its state directory.
    pub id: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Kernel command line; `None` = the VMM's default.
    pub cmdline: Option<String>,
    /// Export a virtio-fs share (for container root filesystems and volumes).
    pub share: bool,
    /// Have the kernel kill the VMM when the thread that starts it ends (the foreground
    /// `brig run`, which owns its microVM). Off, the VMM runs until it is stopped.
    pub tie_to_owner: bool,
    /// The VMM runs on after the process that starts it exits (a pod's sandbox whose
    /// members outlive the keeper of its sandbox container; see [`Sandbox::leave_running`]):
    /// it gets a process group of its own, so that what is meant for its owner's group, such
    /// as the hangup of a terminal its owner controls, does not end it. Not with
    /// `tie_to_owner`.
    pub outlives_owner: bool,
    /// The pod's network namespace (made by CNI): the VMM runs in it, and the guest gets
    /// its interface through a TAP (see `net`). `None`: the guest has loopback only.
    pub netns: Option<PathBuf>,
    /// A network of the runtime's own instead (`brig run --network bridge`): a namespace
    /// wired by the CNI bridge plugin, publishing these ports (see `cni`).
    pub bridge: Option<Vec<crate::cni::PortMapping>>,
}

impl SandboxSpec {
    /// A spec with the configuration's defaults.
    pub fn new(id: impl Into<String>, config: &RuntimeConfig) -> Self {
        Self {
            id: id.into(),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            cmdline: None,
            share: false,
            tie_to_owner: false,
            outlives_owner: false,
            netns: None,
            bridge: None,
        }
    }

    /// A pod of one container, as `brig run` and `brig create` run it: named after the
    /// container, sized for its limits, sharing its root filesystem, and owned by the process
    /// that starts it (the VMM dies with that process, however it ends).
    pub fn pod_of_one(id: impl Into<String>, config: &RuntimeConfig, spec: &Spec) -> Self {
        let mut sandbox = Self::new(id, config);
        sandbox.share = true;
        sandbox.tie_to_owner = true;
        sandbox.fit(spec);
        sandbox
    }

    /// Grow the VM so that a container with `spec`'s limits fits: its memory limit plus
    /// [`GUEST_OVERHEAD_MIB`], and enough vCPUs for its CPU quota. The VM never shrinks
    /// below the configured defaults.
    pub fn fit(&mut self, spec: &Spec) {
        let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
        let memory = resources
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit());
        let cpu = resources.and_then(|r| r.cpu().as_ref());
        self.fit_limits(
            memory,
            cpu.and_then(|c| c.quota()),
            cpu.and_then(|c| c.period()),
        );
    }

    /// Grow the VM for a memory limit (bytes) and a CPU quota per period (µs), as [`Self::fit`]
    /// does for a container's; for limits known otherwise, such as a whole pod's. Values
    /// that are absent, zero or negative mean no limit.
    pub fn fit_limits(&mut self, memory: Option<i64>, quota: Option<i64>, period: Option<u64>) {
        if let Some(bytes) = memory.filter(|l| *l > 0) {
            let mib = u64::try_from(bytes).unwrap_or(0) >> 20;
            self.memory_mib = self.memory_mib.max(mib.saturating_add(GUEST_OVERHEAD_MIB));
        }
        if let (Some(quota), Some(period)) = (quota, period) {
            if quota > 0 && period > 0 {
                let cpus = u64::try_from(quota)
                    .unwrap_or(0)
                    .div_ceil(period)
                    .min(u64::from(MAX_CPUS));
                self.cpus = self.cpus.max(u8::try_from(cpus).unwrap_or(MAX_CPUS));
            }
        }
    }
}

/// What `sandbox.json` records: enough for another process to find and stop the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    /// Sandbox ID.
    pub id: String,
    /// The VMM process.
    pub vmm: ProcessRef,
    /// Whether it exports a share.
    pub share: bool,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// The pod network namespace whose interface was wired to the VM (undone at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The runtime's own CNI network of the sandbox, if it has one (undone at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<crate::cni::CniRecord>,
}

/// The record of the sandbox in `dir`.
pub fn read_record(dir: &Path) -> Result<SandboxRecord, StateError> {
    state::read_record(&dir.join("sandbox.json"))
}

/// The VMM as this process knows it: its child, or a process some other one started.
enum Vmm {
    Child(Child),
    Opened(ProcessRef),
}

/// Errors starting or stopping a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The ID is invalid, or a record cannot be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// No sandbox with this ID runs.
    #[error("sandbox {id} is not running (its microVM is gone)")]
    NotRunning { id: String },
    /// A sandbox with this ID exists.
    #[error("sandbox {id} already exists ({dir}); remove it first")]
    Exists { id: String, dir: PathBuf },
    /// The state root is too long for the VMM's socket paths.
    #[error("the state root {root} is too long: the VMM's vsock sockets ({uds}_PORT) would not fit in a Unix socket address ({max} bytes); choose a shorter `root` in brig.toml (or --root)")]
    RootTooLong {
        root: PathBuf,
        uds: PathBuf,
        max: usize,
    },
    /// The state directory cannot be created.
    #[error("cannot create sandbox directory {dir}: {source}")]
    StateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// The VMM could not be started.
    #[error("cannot start {vmm}: {source}")]
    Spawn {
        vmm: PathBuf,
        source: std::io::Error,
    },
    /// The sandbox directory could not be prepared for the VMM's share.
    #[error(transparent)]
    Share(#[from] share::ShareError),
    /// This host cannot boot the guest kernel (no KVM, or PVM with a stock kernel).
    #[error(transparent)]
    Host(#[from] HostError),
    /// The VMM exited before the agent answered.
    #[error("the microVM exited during boot ({status}){stderr}{hint}{console}")]
    VmmExited {
        status: String,
        stderr: String,
        /// What the VMM's words mean on this host, when they have a known cause.
        hint: String,
        console: String,
    },
    /// The agent did not answer in time.
    #[error("the agent did not answer within {secs} s (last error: {last}){console}")]
    BootTimeout {
        secs: u64,
        last: String,
        console: String,
    },
    /// An agent call failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The pod's network could not be wired to the VM.
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    /// The runtime's own network could not be set up.
    #[error(transparent)]
    Cni(#[from] crate::cni::CniError),
}

/// A running sandbox.
pub struct Sandbox {
    id: String,
    layout: Layout,
    dir: PathBuf,
    vmm: Vmm,
    agent: AgentClient,
    boot_time: Duration,
    share: bool,
    /// The pod network the guest was given (None without one, or for an opened sandbox).
    network: Option<crate::net::PodNetwork>,
}

impl Sandbox {
    /// Boot a microVM for `spec` and wait until its agent answers.
    pub async fn start(config: &RuntimeConfig, spec: &SandboxSpec) -> Result<Self, SandboxError> {
        state::validate_id("sandbox", &spec.id)?;
        // What `brig check` checks, before anything is created: a host that cannot run the
        // guest kernel fails now, not after the boot timeout.
        let kvm = host::preflight(Path::new("/"), &config.kernel, config.pvm_guest_kernel)?;
        let layout = Layout::new(&config.root);
        let dir = layout.sandbox(&spec.id);
        let parent = layout.sandboxes();
        std::fs::create_dir_all(&parent).map_err(|source| SandboxError::StateDir {
            dir: parent.clone(),
            source,
        })?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists {
                    id: spec.id.clone(),
                    dir,
                })
            }
            Err(source) => return Err(SandboxError::StateDir { dir, source }),
        }
        // A network of our own: CNI wires a new namespace, which is then the pod's.
        let mut spec = spec.clone();
        let mut cni = None;
        let mut result = Ok(());
        if let Some(ports) = &spec.bridge {
            let netns = layout.root().join("netns").join(&spec.id);
            match crate::cni::setup(
                &netns,
                &spec.id,
                crate::cni::bridge_conflist(&config.bridge_subnet),
                &config.cni_plugin_dir,
                ports.clone(),
            ) {
                Ok(record) => {
                    spec.netns = Some(record.netns.clone());
                    cni = Some(record);
                }
                Err(e) => result = Err(e.into()),
            }
        }
        let result = match result.and_then(|()| link_vsock(&layout, &spec.id)) {
            Ok(()) => Self::boot(config, &spec, cni.clone(), layout.clone(), &dir, &kvm).await,
            Err(e) => Err(e),
        };
        if result.is_err() {
            if let Some(netns) = &spec.netns {
                if let Err(e) = crate::net::detach(netns) {
                    tracing::warn!("undoing the pod network: {e}");
                }
            }
            if let Some(cni) = &cni {
                crate::cni::teardown(cni);
            }
            unlink_vsock(&layout, &spec.id);
            if let Err(e) = share::remove(&dir) {
                tracing::warn!("cleaning up {}: {e}", dir.display());
            }
        }
        result
    }

    async fn boot(
        config: &RuntimeConfig,
        spec: &SandboxSpec,
        cni: Option<crate::cni::CniRecord>,
        layout: Layout,
        dir: &Path,
        kvm: &KvmKind,
    ) -> Result<Self, SandboxError> {
        let uds = layout.vsock_uds(&spec.id);
        let console = dir.join("console.log");
        // The VMM's own messages go to a file, never to a pipe: nobody reads a pipe once the
        // VM runs, and a full one would stall the VMM's threads in write(). Read-write and
        // not appending, because the VMM caps it (--log-limit) by moving its newest part to
        // the front.
        let vmm_log = dir.join("vmm.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&vmm_log)
            .map_err(|source| SandboxError::StateDir {
                dir: vmm_log.clone(),
                source,
            })?;
        let started = Instant::now();
        let mut cmd = Command::new(&config.vmm);
        cmd.arg("--kernel")
            .arg(&config.kernel)
            .arg("--initrd")
            .arg(&config.initrd)
            .arg("--cpus")
            .arg(spec.cpus.to_string())
            .arg("--memory")
            .arg(format!("{}M", spec.memory_mib))
            .args(config.guest_thp.then_some("--thp"))
            .args(
                config
                    .free_page_reporting
                    .then_some("--free-page-reporting"),
            )
            .arg("--console")
            .arg(&console)
            .arg("--console-limit")
            .arg(config.console_limit.to_string())
            .arg("--log-limit")
            .arg(config.vmm_log_limit.to_string())
            .arg("--vsock-uds")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        // Tied to its owner, a VMM never outlives it, even one killed with SIGKILL (no Drop
        // runs then): the kernel kills it when the thread that started it ends. Such callers
        // start sandboxes from a thread that lives as long as they need the VM (brig: its
        // main thread).
        if spec.tie_to_owner {
            let owner = nix::unistd::getpid();
            // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The owner may have died between fork and prctl: then nobody would kill us.
                    if nix::unistd::getppid() != owner {
                        return Err(std::io::Error::other("the process starting the VMM exited"));
                    }
                    Ok(())
                });
            }
        }
        if spec.outlives_owner {
            cmd.process_group(0);
        }
        // The pod's network: the VMM runs in its namespace and gets the TAP as NET_FD.
        let mut attached = None;
        let mut _netns_file = None;
        if let Some(netns) = &spec.netns {
            attached = crate::net::attach(netns)?;
            let file =
                std::fs::File::open(netns).map_err(|source| crate::net::NetError::Netns {
                    path: netns.clone(),
                    source,
                })?;
            let ns_fd = file.as_raw_fd();
            let tap_fd = attached.as_ref().map(|a| a.tap.as_raw_fd());
            if let Some(a) = &attached {
                let nic = &a.network.interface;
                cmd.arg("--net").arg(format!(
                    "fd={NET_FD},mac={},mtu={},offload={}",
                    crate::net::mac_text(&nic.mac),
                    nic.mtu,
                    if config.net_offload { "on" } else { "off" }
                ));
            }
            // SAFETY: setns, dup2 and fcntl are async-signal-safe and touch only descriptors
            // that stay open across the fork (the namespace file and the TAP, both owned here
            // until spawn returns).
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if let Some(fd) = tap_fd {
                        if fd == NET_FD {
                            // dup2 onto itself keeps close-on-exec: clear it instead.
                            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        } else if libc::dup2(fd, NET_FD) != NET_FD {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            _netns_file = Some(file);
        }
        let mut cmdline = spec
            .cmdline
            .clone()
            .unwrap_or_else(|| DEFAULT_GUEST_CMDLINE.to_string());
        if spec.share {
            let shared = shared_dir(dir);
            std::fs::create_dir_all(&shared).map_err(|source| SandboxError::StateDir {
                dir: shared.clone(),
                source,
            })?;
            share::make_shared(dir)?;
            let mut arg = std::ffi::OsString::from(format!("{SHARE_TAG}="));
            arg.push(&shared);
            cmd.arg("--fs")
                .arg(arg)
                .arg("--fs-cache")
                .arg(&config.fs_cache);
            cmdline.push_str(&format!(" brig.share={SHARE_TAG}"));
        }
        if config.free_page_reporting {
            // Freed memory reported in 128 KiB blocks, not 2 MiB ones: what a guest frees
            // after boot (its initramfs, its init sections) lies in smaller blocks, and an
            // idle sandbox then costs the host 3.3 MB less (lab A/B, 31.3 -> 28.0 MB VMM
            // RSS). Brig's kernel honours the parameter (guest-kernel/build.sh); before
            // kernel_params, so that a user's value wins.
            cmdline.push_str(&format!(
                " page_reporting.page_reporting_order={FREE_PAGE_REPORTING_ORDER}"
            ));
        }
        if !config.kernel_params.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&config.kernel_params);
        }
        cmd.arg("--cmdline").arg(&cmdline);
        let mut vmm = cmd.spawn().map_err(|source| SandboxError::Spawn {
            vmm: config.vmm.clone(),
            source,
        })?;
        let vmm_ref = vmm.id().and_then(ProcessRef::of);
        // The VMM holds the TAP now: ours closes, so the TAP goes when the VMM exits.
        let network = attached.map(|a| a.network);
        drop(_netns_file);

        let mut last = String::from("none yet");
        loop {
            if let Ok(Some(status)) = vmm.try_wait() {
                let stderr = guest_text::file_tail(&vmm_log, CONSOLE_TAIL_LINES).join("\n");
                return Err(SandboxError::VmmExited {
                    status: status.to_string(),
                    hint: host::explain_vmm_failure(kvm, &stderr)
                        .map(|h| format!("\n{h}"))
                        .unwrap_or_default(),
                    stderr: if stderr.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", stderr.trim())
                    },
                    console: console_tail(&console),
                });
            }
            if started.elapsed() > config.boot_timeout {
                kill_child(&mut vmm).await;
                return Err(SandboxError::BootTimeout {
                    secs: config.boot_timeout.as_secs(),
                    last,
                    console: console_tail(&console),
                });
            }
            if uds.exists() {
                match AgentClient::connect(&uds, Duration::from_secs(5)).await {
                    Ok(agent) => match agent.checked_version().await {
                        Ok(_) => {
                            let boot_time = started.elapsed();
                            tracing::debug!(id = %spec.id, ?boot_time, "agent answered");
                            let sandbox = Self {
                                id: spec.id.clone(),
                                layout,
                                dir: dir.to_path_buf(),
                                vmm: Vmm::Child(vmm),
                                agent,
                                boot_time,
                                share: spec.share,
                                network: network.clone(),
                            };
                            let Some(vmm) = vmm_ref else {
                                return Err(SandboxError::NotRunning {
                                    id: spec.id.clone(),
                                });
                            };
                            let record = SandboxRecord {
                                id: spec.id.clone(),
                                vmm,
                                share: spec.share,
                                created: state::now(),
                                netns: spec.netns.clone(),
                                cni,
                            };
                            state::write_atomically(&dir.join("sandbox.json"), &record)?;
                            if let Some(network) = &network {
                                sandbox.agent.configure_network(network).await?;
                            }
                            return Ok(sandbox);
                        }
                        Err(e @ AgentError::Version { .. }) => {
                            kill_child(&mut vmm).await;
                            return Err(e.into());
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Find the running sandbox `id` under the state root `root` (from any process) and
    /// connect to its agent. Dropping the value leaves the sandbox running; [`Self::stop`]
    /// and [`Self::kill`] end it.
    pub async fn open(root: &Path, id: &str) -> Result<Self, SandboxError> {
        state::validate_id("sandbox", id)?;
        let layout = Layout::new(root);
        let dir = layout.sandbox(id);
        let record = match read_record(&dir) {
            Ok(record) => record,
            Err(_) if !dir.exists() => {
                return Err(StateError::NotFound {
                    kind: "sandbox",
                    id: id.to_string(),
                }
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        if !record.vmm.alive() {
            return Err(SandboxError::NotRunning { id: id.to_string() });
        }
        let agent = AgentClient::connect(&layout.vsock_uds(id), OPEN_TIMEOUT).await?;
        agent.checked_version().await?;
        Ok(Self {
            id: id.to_string(),
            layout,
            dir,
            vmm: Vmm::Opened(record.vmm),
            agent,
            boot_time: Duration::ZERO,
            share: record.share,
            network: None,
        })
    }

    /// The network the guest's interface was given (addresses, routes, MTU), if this value
    /// started the sandbox with one.
    pub fn network(&self) -> Option<&crate::net::PodNetwork> {
        self.network.as_ref()
    }

    /// The sandbox ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The state root's layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// From starting the VMM to the agent's first answer (zero for an opened sandbox).
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// PID of the VMM process.
    pub fn vmm_pid(&self) -> Option<u32> {
        match &self.vmm {
            Vmm::Child(child) => child.id(),
            Vmm::Opened(r) => Some(r.pid),
        }
    }

    /// The VMM process as recorded (PID and start time).
    pub fn vmm(&self) -> Option<ProcessRef> {
        match &self.vmm {
            Vmm::Child(_) => self.vmm_pid().and_then(ProcessRef::of),
            Vmm::Opened(r) => Some(*r),
        }
    }

    /// The VMM's hybrid vsock socket.
    pub fn vsock_uds(&self) -> PathBuf {
        self.layout.vsock_uds(&self.id)
    }

    /// Where a host listener must be for guest-initiated connections to host `port`.
    pub fn vsock_listener_path(&self, port: u32) -> PathBuf {
        crate::hybrid_vsock::listener_path(&self.vsock_uds(), port)
    }

    /// The host directory exported to the guest over virtio-fs, if the sandbox has one.
    pub fn share_dir(&self) -> Option<PathBuf> {
        self.share.then(|| shared_dir(&self.dir))
    }

    /// The sandbox's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// If the VMM has exited: its status and the last line of its own log, for the errors of
    /// calls that failed because the microVM went away (`None` while it runs).
    pub fn vmm_exit(&mut self) -> Option<String> {
        let status = match &mut self.vmm {
            Vmm::Child(child) => child.try_wait().ok()??.to_string(),
            Vmm::Opened(r) if !r.alive() => "exited".to_string(),
            Vmm::Opened(_) => return None,
        };
        // Only the log's tail is read, escaped: the guest can make the VMM write to it.
        let why = guest_text::file_tail(&self.dir.join("vmm.log"), 8)
            .into_iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!(": {}", l.trim()))
            .unwrap_or_default();
        let hint = host::explain_vmm_failure(&host::kvm_kind(Path::new("/")), &why)
            .map(|h| format!("; {h}"))
            .unwrap_or_default();
        Some(format!(
            "the microVM stopped unexpectedly ({status}){why}{hint}"
        ))
    }

    /// The guest console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Power the guest off and wait for the VMM to exit; kill it if it does not in time.
    /// Returns the VMM's exit status. (An opened sandbox's VMM is another process's child,
    /// whose status only its parent sees: there the status is success when the agent
    /// acknowledged the power-off and the VMM then exited, SIGKILL's when it was killed.)
    /// The state directory is removed either way.
    pub async fn shutdown(mut self) -> Result<ExitStatus, SandboxError> {
        let status = self.end(false).await;
        self.remove_dir();
        status
    }

    /// End a sandbox whose work is done, quickly: the agent syncs the guest's filesystems and
    /// answers Shutdown, then the VMM is stopped with SIGTERM instead of waiting for the
    /// guest kernel's own reset (nothing is lost: what the guest wrote is synced, and the
    /// guest is thrown away). Without the agent's answer this waits for the power-off as
    /// [`Sandbox::shutdown`] does. The state directory is removed either way.
    pub async fn stop(mut self) -> Result<(), SandboxError> {
        let result = self.end(true).await.map(|_| ());
        self.remove_dir();
        result
    }

    /// Ask the agent to power off; with `terminate`, stop the VMM as soon as it answered.
    /// Then wait for the VMM (killing it after the grace period).
    async fn end(&mut self, terminate: bool) -> Result<ExitStatus, SandboxError> {
        let asked = self.agent.shutdown().await;
        tracing::debug!(id = %self.id, ok = asked.is_ok(), "agent answered Shutdown");
        if let (true, Ok(_)) = (terminate, &asked) {
            self.signal_vmm(libc::SIGTERM);
        }
        let status = match tokio::time::timeout(SHUTDOWN_GRACE, self.wait_vmm()).await {
            Ok(Ok(Some(status))) => status,
            Ok(Ok(None)) if asked.is_ok() => ExitStatus::from_raw(0),
            _ => {
                self.signal_vmm(libc::SIGKILL);
                let status = self
                    .wait_vmm()
                    .await
                    .map_err(|source| SandboxError::Spawn {
                        vmm: "brig-vmm".into(),
                        source,
                    })?;
                status.unwrap_or(ExitStatus::from_raw(libc::SIGKILL))
            }
        };
        tracing::debug!(id = %self.id, %status, "VMM exited");
        // A guest that powered off cleanly did what was asked, even if it went down before
        // its answer reached us; after a good answer, our own SIGTERM (143) is fine too.
        if !status.success() {
            asked?;
        }
        Ok(status)
    }

    fn signal_vmm(&self, signal: i32) {
        if let Some(vmm) = self.vmm() {
            if signal == libc::SIGKILL {
                kill_vmm(&vmm);
            } else {
                let _ = vmm.signal(signal);
            }
        }
    }

    /// Wait for the VMM to exit: its status for a child, `None` for an opened sandbox's.
    async fn wait_vmm(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match &mut self.vmm {
            Vmm::Child(child) => child.wait().await.map(Some),
            Vmm::Opened(r) => {
                while !r.gone() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(None)
            }
        }
    }

    /// Let the sandbox run on after this value (and the process holding it) is gone, as an
    /// opened sandbox is: a pod's sandbox whose microVM outlives the process that booted it
    /// (the keeper of a pod's sandbox container, whose members still run). Whoever removes
    /// the sandbox ([`remove_sandbox`]) ends it. Start such a sandbox with
    /// [`SandboxSpec::outlives_owner`] and without [`SandboxSpec::tie_to_owner`], or the
    /// kernel kills the VMM with its owner anyway.
    pub fn leave_running(mut self) {
        let Some(vmm) = self.vmm() else {
            return; // already gone: Drop cleans up
        };
        if let Vmm::Child(child) = std::mem::replace(&mut self.vmm, Vmm::Opened(vmm)) {
            // tokio kills a dropped child it was told to (`kill_on_drop`, which guards a boot
            // abandoned halfway); forgotten, the VMM runs on and is reparented when this
            // process exits, whose child reaper the descriptor-free handle does not need.
            std::mem::forget(child);
        }
    }

    /// Stop the VMM at once (SIGKILL) and clean up.
    pub async fn kill(mut self) -> Result<ExitStatus, SandboxError> {
        self.signal_vmm(libc::SIGKILL);
        let status = self
            .wait_vmm()
            .await
            .map(|s| s.unwrap_or(ExitStatus::from_raw(libc::SIGKILL)))
            .map_err(|source| SandboxError::Spawn {
                vmm: "brig-vmm".into(),
                source,
            });
        self.remove_dir();
        status
    }

    /// Unmount every bind under the share and remove the sandbox directory; never crosses
    /// into another filesystem, so a user's rootfs or volume is never deleted through a mount.
    fn remove_dir(&self) {
        undo_network(&self.dir);
        unlink_vsock(&self.layout, &self.id);
        if let Err(e) = share::remove(&self.dir) {
            tracing::warn!("cleaning up {}: {e}", self.dir.display());
        }
    }
}

/// SIGKILL a VMM. brig-vmm runs the VM in a process of its own, PID 1 of its own PID
/// namespace, under a supervisor (the VMM's PID to us) that ends as the VM ends. The kill goes
/// to the VM, and the supervisor follows once it has reaped it: so when the supervisor is
/// gone, the VM is too (a kill of the supervisor would leave the VM dying on its own for a
/// moment after we took it for gone). The supervisor itself when it has no child: before its
/// fork, or a VMM run with --no-confine.
fn kill_vmm(vmm: &ProcessRef) {
    let mut sent = false;
    for vm in vmm.children() {
        sent |= vm.signal(libc::SIGKILL).unwrap_or(false);
    }
    if !sent {
        let _ = vmm.signal(libc::SIGKILL);
    }
}

/// The processes that run sandbox `id`'s VM (the VMM's children), as its record names the
/// VMM now: empty when there is no record or the VMM is gone.
pub fn vm_processes(root: &Path, id: &str) -> Vec<ProcessRef> {
    if state::validate_id("sandbox", id).is_err() {
        return Vec::new();
    }
    read_record(&Layout::new(root).sandbox(id))
        .map(|record| record.vmm.children())
        .unwrap_or_default()
}

/// [`kill_vmm`] for the VMM we started, and reap it.
async fn kill_child(vmm: &mut tokio::process::Child) {
    match vmm.id().and_then(ProcessRef::of) {
        Some(r) => kill_vmm(&r),
        None => {
            let _ = vmm.start_kill();
        }
    }
    let _ = vmm.wait().await;
}

/// The directory a sandbox in `dir` exports to its guest over virtio-fs (each container's
/// root filesystem and volumes under `shared/<container ID>`).
pub fn shared_dir(dir: &Path) -> PathBuf {
    dir.join("shared")
}

/// Remove what is left of sandbox `id` under `root` from any process: kill its VMM if it
/// still runs (and wait until it is gone), unmount its binds and remove its directory. For
/// a sandbox whose owner died (the shim's `delete`, `brig rm -f`).
pub fn remove_sandbox(root: &Path, id: &str) -> Result<(), SandboxError> {
    state::validate_id("sandbox", id)?;
    let layout = Layout::new(root);
    let dir = layout.sandbox(id);
    undo_network(&dir);
    if let Ok(record) = read_record(&dir) {
        kill_vmm(&record.vmm);
        // Until it is gone from the process table, not only dead: its parent reaps it.
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while !record.vmm.gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    unlink_vsock(&layout, id);
    share::remove(&dir)?;
    Ok(())
}

/// Undo the pod network wiring that the record in sandbox directory `dir` names, and the
/// runtime's own CNI network.
fn undo_network(dir: &Path) {
    let Ok(record) = read_record(dir) else {
        return;
    };
    if let Some(netns) = &record.netns {
        if let Err(e) = crate::net::detach(netns) {
            tracing::warn!("undoing the pod network: {e}");
        }
    }
    if let Some(cni) = &record.cni {
        crate::cni::teardown(cni);
    }
}

/// Make `v/KEY` link to sandbox `id`'s directory (see [`Layout::vsock_uds`]), replacing a
/// link a crashed sandbox of the same ID left; and check that its socket paths fit.
fn link_vsock(layout: &Layout, id: &str) -> Result<(), SandboxError> {
    let uds = layout.vsock_uds(id);
    // The longest listener path: `<uds>_<port>` with a 10-digit port.
    if uds.as_os_str().len() + 11 > state::MAX_SOCKET_PATH {
        return Err(SandboxError::RootTooLong {
            root: layout.root().to_path_buf(),
            uds,
            max: state::MAX_SOCKET_PATH,
        });
    }
    let link = layout.vsock_link(id);
    let target = Path::new("../sandboxes").join(id);
    let dir_err = |source| SandboxError::StateDir {
        dir: link.clone(),
        source,
    };
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(dir_err)?;
    }
    if let Ok(old) = std::fs::read_link(&link) {
        // Another live sandbox's whose ID hashes alike: never take its socket.
        if old != target && link.exists() {
            return Err(SandboxError::StateDir {
                dir: link.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("in use by {}", old.display()),
                ),
            });
        }
        std::fs::remove_file(&link).map_err(dir_err)?;
    }
    std::os::unix::fs::symlink(&target, &link).map_err(dir_err)
}

/// Remove sandbox `id`'s `v/KEY` link, if it is its own.
fn unlink_vsock(layout: &Layout, id: &str) {
    let link = layout.vsock_link(id);
    if std::fs::read_link(&link).is_ok_and(|t| t == Path::new("../sandboxes").join(id)) {
        if let Err(e) = std::fs::remove_file(&link) {
            tracing::warn!("removing {}: {e}", link.display());
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Never leak a VM: the value that started the VMM ends it (and removes the state
        // directory) unless it was stopped already. An opened sandbox is left running.
        let Vmm::Child(child) = &mut self.vmm else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            match child.id().and_then(ProcessRef::of) {
                Some(vmm) => kill_vmm(&vmm),
                None => {
                    let _ = child.start_kill();
                }
            }
            if let Some(pid) = child.id() {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            }
        }
        if self.dir.exists() {
            self.remove_dir();
        }
    }
}

/// The console's last lines for an error: the guest wrote them, so only the file's tail is
/// read, and every line is escaped and bounded.
fn console_tail(path: &Path) -> String {
    let tail = guest_text::file_tail(path, CONSOLE_TAIL_LINES);
    if tail.is_empty() {
        return String::new();
    }
    format!(
        "\n--- guest console (last {} lines) ---\n{}",
        tail.len(),
        tail.join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cri_pod_s_socket_paths_fit_and_the_link_is_the_sandbox_s_own() {
        let id = "4e65be0388bd69687333880cefc367ab3ec671d9cd31bd04714081f3057d4a8a";
        let shim_root = Layout::new(Path::new("/run/brig/containerd/k8s.io"));
        assert!(shim_root.vsock_uds(id).as_os_str().len() + 11 <= state::MAX_SOCKET_PATH);
        assert_ne!(shim_root.vsock_link(id), shim_root.vsock_link("other"));

        let root = std::env::temp_dir().join(format!("brig-vsock-link-{}", std::process::id()));
        let layout = Layout::new(&root);
        std::fs::create_dir_all(layout.sandbox(id)).unwrap();
        link_vsock(&layout, id).unwrap();
        // A stale link of the same sandbox is replaced.
        link_vsock(&layout, id).unwrap();
        std::fs::write(layout.sandbox(id).join("vsock.sock"), b"").unwrap();
        assert!(
            layout.vsock_uds(id).exists(),
            "the socket is reached through the link"
        );
        // A live link of another sandbox is never taken over (as if both IDs hashed alike).
        let other = "other";
        std::fs::create_dir_all(layout.sandbox(other)).unwrap();
        std::fs::create_dir_all(layout.vsock_link(other).parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(Path::new("../sandboxes").join(id), layout.vsock_link(other))
            .unwrap();
        assert!(matches!(
            link_vsock(&layout, other),
            Err(SandboxError::StateDir { .. })
        ));
        unlink_vsock(&layout, other);
        assert!(layout.vsock_link(other).exists(), "not its own link: kept");
        unlink_vsock(&layout, id);
        assert!(
            std::fs::read_link(layout.vsock_link(id)).is_err(),
            "its own link is gone"
        );

        let long = Layout::new(&PathBuf::from("/").join("r".repeat(80)));
        assert!(matches!(
            link_vsock(&long, id),
            Err(SandboxError::RootTooLong { .. })
        ));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn spec_with(memory: Option<i64>, quota: Option<(i64, u64)>) -> Spec {
        let mut resources = oci_spec::runtime::LinuxResources::default();
        if let Some(limit) = memory {
            resources.set_memory(Some(
                oci_spec::runtime::LinuxMemoryBuilder::default()
                    .limit(limit)
                    .build()
                    .unwrap(),
            ));
        }
        if let Some((q, p)) = quota {
            resources.set_cpu(Some(
                oci_spec::runtime::LinuxCpuBuilder::default()
                    .quota(q)
                    .period(p)
                    .build()
                    .unwrap(),
            ));
        }
        let mut spec = Spec::default();
        spec.linux_mut()
            .as_mut()
            .unwrap()
            .set_resources(Some(resources));
        spec
    }

    #[test]
    fn the_vm_grows_to_fit_the_containers_limits_and_never_shrinks() {
        let config = RuntimeConfig {
            kernel: "vmlinux".into(),
            initrd: "initrd".into(),
            vmm: "brig-vmm".into(),
            root: "/run/brig".into(),
            cpus: 1,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(1),
            fs_cache: "auto".into(),
            console_limit: crate::config::DEFAULT_LOG_LIMIT,
            vmm_log_limit: crate::config::DEFAULT_LOG_LIMIT,
            network: "none".into(),
            bridge_subnet: "10.89.0.0/24".into(),
            cni_plugin_dir: "/usr/lib/cni".into(),
            net_offload: true,
            pvm_guest_kernel: false,
            guest_thp: false,
            kernel_params: String::new(),
            free_page_reporting: true,
            image_root: "/var/lib/brig".into(),
            insecure_registries: Vec::new(),
        };
        let mut s = SandboxSpec::new("a", &config);
        s.fit(&spec_with(Some(512 << 20), Some((250_000, 100_000))));
        assert_eq!((s.cpus, s.memory_mib), (3, 512 + GUEST_OVERHEAD_MIB));
        let mut s = SandboxSpec::new("a", &config);
        s.fit(&spec_with(Some(16 << 20), Some((50_000, 100_000))));
        assert_eq!(
            (s.cpus, s.memory_mib),
            (1, 256),
            "small limits keep the defaults"
        );
        let mut s = SandboxSpec::new("a", &config);
        s.fit(&spec_with(Some(-1), Some((-1, 100_000))));
        assert_eq!(
            (s.cpus, s.memory_mib),
            (1, 256),
            "unlimited (-1) changes nothing"
        );
        s.fit(&spec_with(None, Some((i64::MAX, 1))));
        assert_eq!(s.cpus, MAX_CPUS);
    }
}

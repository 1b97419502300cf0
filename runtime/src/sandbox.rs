//! A sandbox: one microVM (a `brig-vmm` process) with the agent answering inside.
//!
//! Everything a sandbox owns lives in `<root>/<id>/` (the VMM's vsock socket, the console
//! log, the VMM's own log) and is removed when the sandbox ends, however it ends.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::agent::{AgentClient, AgentError};
use crate::config::RuntimeConfig;
use crate::share::{self, SHARE_TAG};

/// The guest kernel command line (brig-vmm appends its device declarations).
pub const DEFAULT_GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule quiet";

/// How long the VMM gets to exit after the guest was asked to power off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Lines of the guest console quoted in boot errors.
const CONSOLE_TAIL_LINES: usize = 30;

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
}

impl SandboxSpec {
    /// A spec with the configuration's defaults.
    pub fn new(id: impl Into<String>, config: &RuntimeConfig) -> Self {
        Self { id: id.into(), cpus: config.cpus, memory_mib: config.memory_mib, cmdline: None, share: false }
    }
}

/// Errors starting or stopping a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The ID cannot name a directory.
    #[error("invalid sandbox id {0:?}: use letters, digits, '-', '_' and '.', at most 64 characters")]
    BadId(String),
    /// A sandbox with this ID exists.
    #[error("sandbox {id} already exists ({dir}); remove it first")]
    Exists { id: String, dir: PathBuf },
    /// The state directory cannot be created.
    #[error("cannot create sandbox directory {dir}: {source}")]
    StateDir { dir: PathBuf, source: std::io::Error },
    /// The VMM could not be started.
    #[error("cannot start {vmm}: {source}")]
    Spawn { vmm: PathBuf, source: std::io::Error },
    /// The sandbox directory could not be prepared for the VMM's share.
    #[error(transparent)]
    Share(#[from] share::ShareError),
    /// The VMM exited before the agent answered.
    #[error("the microVM exited during boot ({status}){stderr}{console}")]
    VmmExited { status: String, stderr: String, console: String },
    /// The agent did not answer in time.
    #[error("the agent did not answer within {secs} s (last error: {last}){console}")]
    BootTimeout { secs: u64, last: String, console: String },
    /// An agent call failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// A running sandbox.
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    vmm: Child,
    agent: AgentClient,
    boot_time: Duration,
    share: bool,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Sandbox {
    /// Boot a microVM for `spec` and wait until its agent answers.
    pub async fn start(config: &RuntimeConfig, spec: &SandboxSpec) -> Result<Self, SandboxError> {
        if !valid_id(&spec.id) {
            return Err(SandboxError::BadId(spec.id.clone()));
        }
        let dir = config.root.join(&spec.id);
        std::fs::create_dir_all(&config.root).map_err(|source| SandboxError::StateDir { dir: config.root.clone(), source })?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists { id: spec.id.clone(), dir })
            }
            Err(source) => return Err(SandboxError::StateDir { dir, source }),
        }
        let result = Self::boot(config, spec, &dir).await;
        if result.is_err() {
            if let Err(e) = share::remove(&dir) {
                tracing::warn!("cleaning up {}: {e}", dir.display());
            }
        }
        result
    }

    async fn boot(config: &RuntimeConfig, spec: &SandboxSpec, dir: &Path) -> Result<Self, SandboxError> {
        let uds = dir.join("vsock.sock");
        let console = dir.join("console.log");
        // The VMM's own messages go to a file, never to a pipe: nobody reads a pipe once the
        // VM runs, and a full one would stall the VMM's threads in write().
        let vmm_log = dir.join("vmm.log");
        let log_file = std::fs::File::create(&vmm_log).map_err(|source| SandboxError::StateDir { dir: vmm_log.clone(), source })?;
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
            .arg("--console")
            .arg(&console)
            .arg("--vsock-uds")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        // A VMM never outlives its owner, even one killed with SIGKILL (no Drop runs then): the
        // kernel kills it when the thread that started it ends. Callers start sandboxes from a
        // thread that lives as long as they need the VM (brig: its main thread).
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
        let mut cmdline = spec.cmdline.clone();
        if spec.share {
            let shared = dir.join("shared");
            std::fs::create_dir_all(&shared).map_err(|source| SandboxError::StateDir { dir: shared.clone(), source })?;
            share::make_shared(dir)?;
            let mut arg = std::ffi::OsString::from(format!("{SHARE_TAG}="));
            arg.push(&shared);
            cmd.arg("--fs").arg(arg).arg("--fs-cache").arg(&config.fs_cache);
            let base = cmdline.take().unwrap_or_else(|| DEFAULT_GUEST_CMDLINE.to_string());
            cmdline = Some(format!("{base} brig.share={SHARE_TAG}"));
        }
        if let Some(cmdline) = &cmdline {
            cmd.arg("--cmdline").arg(cmdline);
        }
        let mut vmm = cmd.spawn().map_err(|source| SandboxError::Spawn { vmm: config.vmm.clone(), source })?;

        let mut last = String::from("none yet");
        loop {
            if let Ok(Some(status)) = vmm.try_wait() {
                let stderr = std::fs::read_to_string(&vmm_log).unwrap_or_default();
                return Err(SandboxError::VmmExited {
                    status: status.to_string(),
                    stderr: if stderr.is_empty() { String::new() } else { format!(": {}", stderr.trim()) },
                    console: console_tail(&console),
                });
            }
            if started.elapsed() > config.boot_timeout {
                let _ = vmm.kill().await;
                return Err(SandboxError::BootTimeout {
                    secs: config.boot_timeout.as_secs(),
                    last,
                    console: console_tail(&console),
                });
            }
            if uds.exists() {
                match AgentClient::connect(&uds, Duration::from_secs(5)).await {
                    Ok(agent) => match agent.version().await {
                        Ok(_) => {
                            let boot_time = started.elapsed();
                            tracing::debug!(id = %spec.id, ?boot_time, "agent answered");
                            return Ok(Self {
                                id: spec.id.clone(),
                                dir: dir.to_path_buf(),
                                vmm,
                                agent,
                                boot_time,
                                share: spec.share,
                            });
                        }
                        Err(e) => last = e.to_string(),
                    },
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The sandbox ID.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// From starting the VMM to the agent's first answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// PID of the VMM process.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.id()
    }

    /// The VMM's hybrid vsock socket.
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// Where a host listener must be for guest-initiated connections to host `port`.
    pub fn vsock_listener_path(&self, port: u32) -> PathBuf {
        self.dir.join(format!("vsock.sock_{port}"))
    }

    /// The host directory exported to the guest over virtio-fs, if the sandbox has one.
    pub fn share_dir(&self) -> Option<PathBuf> {
        self.share.then(|| self.dir.join("shared"))
    }

    /// The sandbox's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// If the VMM has exited: its status and the last line of its own log, for the errors of
    /// calls that failed because the microVM went away (`None` while it runs).
    pub fn vmm_exit(&mut self) -> Option<String> {
        let status = self.vmm.try_wait().ok()??;
        let log = std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
        let why = log.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!(": {}", l.trim())).unwrap_or_default();
        Some(format!("the microVM stopped unexpectedly ({status}){why}"))
    }

    /// The guest console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Power the guest off and wait for the VMM to exit; kill it if it does not in time.
    /// Returns the VMM's exit status. The state directory is removed either way.
    pub async fn shutdown(mut self) -> Result<ExitStatus, SandboxError> {
        self.end(false).await
    }

    /// End a sandbox whose work is done, quickly: the agent syncs the guest's filesystems and
    /// answers Shutdown, then the VMM is stopped with SIGTERM instead of waiting for the
    /// guest kernel's own reset (nothing is lost: what the guest wrote is synced, and the
    /// guest is thrown away). Without the agent's answer this waits for the power-off as
    /// [`Sandbox::shutdown`] does. The state directory is removed either way.
    pub async fn stop(mut self) -> Result<(), SandboxError> {
        self.end(true).await.map(|_| ())
    }

    /// Ask the agent to power off; with `terminate`, stop the VMM as soon as it answered.
    /// Then wait for the VMM (killing it after the grace period).
    async fn end(&mut self, terminate: bool) -> Result<ExitStatus, SandboxError> {
        let asked = self.agent.shutdown().await;
        tracing::debug!(id = %self.id, ok = asked.is_ok(), "agent answered Shutdown");
        if let (true, Ok(_), Some(pid)) = (terminate, &asked, self.vmm.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
        let status = match tokio::time::timeout(SHUTDOWN_GRACE, self.vmm.wait()).await {
            Ok(Ok(status)) => status,
            _ => {
                let _ = self.vmm.kill().await;
                self.vmm.wait().await.map_err(|source| SandboxError::Spawn { vmm: "brig-vmm".into(), source })?
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

    /// Stop the VMM at once (SIGKILL) and clean up.
    pub async fn kill(mut self) -> Result<ExitStatus, SandboxError> {
        let _ = self.vmm.start_kill();
        self.vmm.wait().await.map_err(|source| SandboxError::Spawn { vmm: "brig-vmm".into(), source })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Never leak a VM: if the VMM still runs, kill it, then remove the state directory.
        if let Ok(None) = self.vmm.try_wait() {
            let _ = self.vmm.start_kill();
            if let Some(pid) = self.vmm.id() {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            }
        }
        // Unmounts every bind under the share first and never crosses into another
        // filesystem: a user's rootfs or volume is never deleted through a mount.
        if let Err(e) = share::remove(&self.dir) {
            tracing::warn!("cleaning up {}: {e}", self.dir.display());
        }
    }
}

fn console_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..];
    format!("\n--- guest console (last {} lines) ---\n{}", tail.len(), tail.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_must_name_a_plain_directory() {
        assert!(valid_id("pod-1_a.b"));
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}

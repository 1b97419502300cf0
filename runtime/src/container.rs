//! Containers in a sandbox: share their root filesystem and volumes with the guest, open
//! their stdio streams, and drive them through the agent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use brig_protocols::agent::{StdioPorts, WaitProcessResponse};
use oci_spec::runtime::{MountBuilder, Spec};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::{AgentClient, AgentError};
use crate::sandbox::Sandbox;
use crate::share::{self, ShareError, GUEST_SHARE_DIR};

/// How long the agent gets to open a process's stdio streams.
const STDIO_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// First host vsock port used for stdio streams.
const STDIO_PORT_BASE: u32 = 0x1_0000;

static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A host vsock port for a stdio stream. Several host processes (the one that runs a
/// container, `brig exec` next to it) listen on one sandbox's ports, so each process counts
/// from its own start, spread by its PID; a port that is taken is skipped when binding.
fn next_port() -> u32 {
    let n = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
    let per_process = (std::process::id() % 0x7fff) << 12;
    STDIO_PORT_BASE + per_process + (n % 0x1000)
}

/// A host path made visible in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Host file or directory.
    pub host: PathBuf,
    /// Absolute path in the container.
    pub container: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// Container ID.
    pub id: String,
    /// The OCI spec; `root.path` is ignored in favour of `rootfs`.
    pub spec: Spec,
    /// Host directory holding the root filesystem.
    pub rootfs: PathBuf,
    /// Host paths to bind into the container.
    pub volumes: Vec<Volume>,
    /// Open a stdin stream.
    pub stdin: bool,
}

/// The stdio streams of a process, connected by the agent. With a terminal, `stdout`
/// carries the terminal's output and `stdin` its input; `stderr` is `None`.
#[derive(Debug, Default)]
pub struct Stdio {
    /// Write here, shut down the write side for EOF.
    pub stdin: Option<UnixStream>,
    /// The process's standard output.
    pub stdout: Option<UnixStream>,
    /// The process's standard error.
    pub stderr: Option<UnixStream>,
}

/// Errors creating or driving a container.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// Preparing the share failed.
    #[error(transparent)]
    Share(#[from] ShareError),
    /// A stdio stream could not be set up.
    #[error("stdio stream: {0}")]
    Stdio(String),
    /// The spec could not be serialized or adjusted.
    #[error("invalid container spec: {0}")]
    Spec(String),
    /// The agent refused or failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// How a process ended, as the host reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal.
    pub code: i32,
    /// The cgroup's OOM killer struck.
    pub oom_killed: bool,
}

impl From<WaitProcessResponse> for ExitStatus {
    fn from(r: WaitProcessResponse) -> Self {
        Self { code: r.exit_status, oom_killed: r.oom_killed }
    }
}

struct PendingStdio {
    listeners: Vec<(u32, PathBuf, UnixListener)>,
    ports: StdioPorts,
}

impl PendingStdio {
    fn bind(vsock_uds: &Path, stdin: bool, stderr: bool) -> Result<Self, ContainerError> {
        let mut listeners = Vec::new();
        let mut ports = StdioPorts::new();
        let open = |listeners: &mut Vec<(u32, PathBuf, UnixListener)>| -> Result<u32, ContainerError> {
            for _ in 0..64 {
                let port = next_port();
                let mut path = vsock_uds.as_os_str().to_owned();
                path.push(format!("_{port}"));
                let path = PathBuf::from(path);
                match UnixListener::bind(&path) {
                    Ok(listener) => {
                        listeners.push((port, path, listener));
                        return Ok(port);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                    Err(e) => return Err(ContainerError::Stdio(format!("listening on {}: {e}", path.display()))),
                }
            }
            Err(ContainerError::Stdio("no free host vsock port for a stdio stream".into()))
        };
        if stdin {
            ports.stdin = open(&mut listeners)?;
        }
        ports.stdout = open(&mut listeners)?;
        if stderr {
            ports.stderr = open(&mut listeners)?;
        }
        Ok(Self { listeners, ports })
    }

    /// Accept the agent's connection on every port.
    async fn accept(self) -> Result<Stdio, ContainerError> {
        let mut stdio = Stdio::default();
        for (port, path, listener) in self.listeners {
            let accepted = tokio::time::timeout(STDIO_CONNECT_TIMEOUT, listener.accept()).await;
            let _ = std::fs::remove_file(&path);
            let (stream, _) = accepted
                .map_err(|_| ContainerError::Stdio(format!("the agent did not open the stream on port {port}")))?
                .map_err(|e| ContainerError::Stdio(e.to_string()))?;
            let slot = if port == self.ports.stdin && port != 0 {
                &mut stdio.stdin
            } else if port == self.ports.stdout {
                &mut stdio.stdout
            } else {
                &mut stdio.stderr
            };
            *slot = Some(stream);
        }
        Ok(stdio)
    }
}

/// Guest path of a container's files in the share.
fn guest_dir(id: &str) -> PathBuf {
    Path::new(GUEST_SHARE_DIR).join(id)
}

impl Sandbox {
    /// Create a container: bind its root filesystem and volumes into the share, open its
    /// stdio streams, and have the agent set it up (its command does not run yet).
    pub async fn create_container(&self, config: &ContainerConfig) -> Result<Stdio, ContainerError> {
        let share = self.share_dir().ok_or_else(|| ContainerError::Spec("the sandbox has no share".into()))?;
        let SharedContainer { spec_json, rootfs } = share_container(&share, config)?;
        let terminal = config.spec.process().as_ref().and_then(|p| p.terminal()).unwrap_or(false);
        let pending = PendingStdio::bind(&self.vsock_uds(), config.stdin, !terminal)?;
        let ports = pending.ports.clone();
        let create = self.agent().create_container(&config.id, spec_json, rootfs, ports);
        // The agent connects the streams before CreateContainer returns: accept meanwhile.
        let accepting = tokio::spawn(pending_accept(pending));
        let created = create.await;
        tracing::debug!(id = %config.id, ok = created.is_ok(), "agent answered CreateContainer");
        match created {
            Ok(_) => accepting
                .await
                .map_err(|e| ContainerError::Stdio(e.to_string()))?,
            Err(e) => {
                accepting.abort();
                Err(e.into())
            }
        }
    }

}

/// A container's files in a share, and the CreateContainer fields that name them.
#[derive(Debug, Clone)]
pub struct SharedContainer {
    /// The OCI spec as JSON, its bind mounts pointing at the volumes in the share.
    pub spec_json: String,
    /// Guest path of the root filesystem (under /run/brig/shared).
    pub rootfs: String,
}

/// Bind `config`'s root filesystem and volumes into the host directory `share` (what the
/// guest's agent mounts at /run/brig/shared, whichever file server exports it) and return
/// what CreateContainer needs to find them.
pub fn share_container(share: &Path, config: &ContainerConfig) -> Result<SharedContainer, ContainerError> {
    let host_dir = share.join(&config.id);
    share::bind(&config.rootfs, &host_dir.join("rootfs"), false)?;
    let mut spec = config.spec.clone();
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for (i, v) in config.volumes.iter().enumerate() {
        share::bind(&v.host, &host_dir.join(format!("volumes/{i}")), v.read_only)?;
        let mut options = vec!["rbind".to_string(), "rprivate".to_string()];
        if v.read_only {
            options.push("ro".to_string());
        }
        let mount = MountBuilder::default()
            .destination(&v.container)
            .typ("bind")
            .source(guest_dir(&config.id).join(format!("volumes/{i}")))
            .options(options)
            .build()
            .map_err(|e| ContainerError::Spec(e.to_string()))?;
        mounts.push(mount);
    }
    spec.set_mounts(Some(mounts));
    let spec_json = serde_json::to_string(&spec).map_err(|e| ContainerError::Spec(e.to_string()))?;
    let rootfs = guest_dir(&config.id).join("rootfs").display().to_string();
    Ok(SharedContainer { spec_json, rootfs })
}

/// Run a process in a running container (`exec`) through `agent`, with stdio streams
/// listened for next to the VMM's vsock socket `vsock_uds`. Works from any host process,
/// not only the one that owns the sandbox.
pub async fn exec_process(
    agent: &AgentClient,
    vsock_uds: &Path,
    container_id: &str,
    exec_id: &str,
    process_json: String,
    stdin: bool,
    terminal: bool,
) -> Result<Stdio, ContainerError> {
    let pending = PendingStdio::bind(vsock_uds, stdin, !terminal)?;
    let ports = pending.ports.clone();
    let accepting = tokio::spawn(pending_accept(pending));
    match agent.exec_process(container_id, exec_id, process_json, ports).await {
        Ok(()) => accepting.await.map_err(|e| ContainerError::Stdio(e.to_string()))?,
        Err(e) => {
            accepting.abort();
            Err(e.into())
        }
    }
}

async fn pending_accept(pending: PendingStdio) -> Result<Stdio, ContainerError> {
    let paths: Vec<PathBuf> = pending.listeners.iter().map(|(_, p, _)| p.clone()).collect();
    let result = pending.accept().await;
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    result
}

//! Containers in a sandbox: share their root filesystem and volumes with the guest, open
//! their stdio streams, and drive them through the agent.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use brig_protocols::agent::{StdioPorts, WaitProcessResponse};
use oci_spec::runtime::{MountBuilder, Process, Spec, UserBuilder};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::{AgentClient, AgentError, ErrorKind};
pub use crate::resources::{Resources, Stats};
use crate::sandbox::{self, Sandbox, SandboxError};
use crate::share::{self, ShareError, GUEST_SHARE_DIR};
use crate::spec::{self as oci, SpecError};
use crate::state::{ContainerState, Layout, ProcessRef, StateError, Status};

/// How long the agent gets to open a process's stdio streams.
const STDIO_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection to a stdio port gets to present the stream's token.
const STDIO_TOKEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes of a stdio token.
const STDIO_TOKEN_LEN: usize = 16;
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

impl std::str::FromStr for Volume {
    type Err = SpecError;

    /// `HOST:CONTAINER[:ro|:rw]`, both paths absolute, the host path existing.
    fn from_str(v: &str) -> Result<Self, SpecError> {
        let bad = |why: &str| SpecError::Invalid(format!("--volume {v:?}: {why}"));
        let parts: Vec<&str> = v.split(':').collect();
        let (host, ctr, read_only) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            _ => return Err(bad("use HOST:CONTAINER or HOST:CONTAINER:ro")),
        };
        let host = PathBuf::from(host);
        if !host.is_absolute() {
            return Err(bad("the host path must be absolute"));
        }
        if !host.exists() {
            return Err(bad(&format!("host path {} does not exist", host.display())));
        }
        if !ctr.starts_with('/') {
            return Err(bad("the container path must be absolute"));
        }
        Ok(Volume {
            host,
            container: ctr.into(),
            read_only,
        })
    }
}

impl Volume {
    /// Take the spec's bind mounts of existing host files and directories out of `spec`, as
    /// volumes: the guest sees the host's paths only through the share (CRI's and podman's
    /// /etc/hosts and /etc/resolv.conf, Kubernetes volumes, `-v` of an engine). Other mounts
    /// stay in the spec.
    pub fn take_host_binds(spec: &mut Spec) -> Vec<Volume> {
        let mut volumes = Vec::new();
        if let Some(mounts) = spec.mounts_mut() {
            mounts.retain(|m| {
                let options = m.options().clone().unwrap_or_default();
                let is_bind = m.typ().as_deref() == Some("bind")
                    || options.iter().any(|o| o == "bind" || o == "rbind");
                match m.source() {
                    Some(source) if is_bind && source.is_absolute() && source.exists() => {
                        volumes.push(Volume {
                            host: source.clone(),
                            container: m.destination().clone(),
                            read_only: options.iter().any(|o| o == "ro"),
                        });
                        false
                    }
                    _ => true,
                }
            });
        }
        volumes
    }
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
    /// The OCI bundle the spec came from, if any: the state its guest hooks read names it.
    pub bundle: Option<PathBuf>,
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
    /// The container's record.
    #[error(transparent)]
    State(#[from] StateError),
    /// Its sandbox.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Its pod.
    #[error(transparent)]
    Pod(#[from] crate::pod::PodError),
    /// The container is not in a state that allows the call.
    #[error("container {id} is {status}: {what}")]
    WrongState {
        /// The container.
        id: String,
        /// Its status.
        status: &'static str,
        /// What cannot be done, and what to do instead.
        what: &'static str,
    },
}

impl ContainerError {
    /// The exit status runc gives a command that cannot start: 127 when it does not exist,
    /// 126 when it cannot be executed; `None` for every other failure.
    pub fn command_status(&self) -> Option<u8> {
        match self {
            ContainerError::Agent(a) => match a.kind() {
                Some(ErrorKind::NotFound) => Some(127),
                Some(ErrorKind::PermissionDenied) => Some(126),
                _ => None,
            },
            _ => None,
        }
    }
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
        Self {
            code: r.exit_status,
            oom_killed: r.oom_killed,
        }
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
        let open =
            |listeners: &mut Vec<(u32, PathBuf, UnixListener)>| -> Result<u32, ContainerError> {
                for _ in 0..64 {
                    let port = next_port();
                    let path = crate::hybrid_vsock::listener_path(vsock_uds, port);
                    match UnixListener::bind(&path) {
                        Ok(listener) => {
                            listeners.push((port, path, listener));
                            return Ok(port);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                        Err(e) => {
                            return Err(ContainerError::Stdio(format!(
                                "listening on {}: {e}",
                                path.display()
                            )))
                        }
                    }
                }
                Err(ContainerError::Stdio(
                    "no free host vsock port for a stdio stream".into(),
                ))
            };
        ports.token = stdio_token()?;
        if stdin {
            ports.stdin = open(&mut listeners)?;
        }
        ports.stdout = open(&mut listeners)?;
        if stderr {
            ports.stderr = open(&mut listeners)?;
        }
        Ok(Self { listeners, ports })
    }

    /// Accept the agent's connection on every port: the first one that presents the token.
    async fn accept(self) -> Result<Stdio, ContainerError> {
        let mut stdio = Stdio::default();
        for (port, path, listener) in self.listeners {
            let accepted = tokio::time::timeout(
                STDIO_CONNECT_TIMEOUT,
                accept_with_token(&listener, port, &self.ports.token),
            )
            .await;
            let _ = std::fs::remove_file(&path);
            let stream = accepted.map_err(|_| {
                ContainerError::Stdio(format!("the agent did not open the stream on port {port}"))
            })??;
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

/// A fresh secret for one request's stdio streams (see `StdioPorts.token`).
fn stdio_token() -> Result<Vec<u8>, ContainerError> {
    use std::io::Read;
    let mut token = vec![0u8; STDIO_TOKEN_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut token))
        .map_err(|e| ContainerError::Stdio(format!("reading /dev/urandom: {e}")))?;
    Ok(token)
}

/// The first connection on `listener` whose first bytes are `token`. Any other connection
/// (a guest process that raced the agent to the port, or one that says nothing) is closed
/// and logged, and the real stream is still waited for.
async fn accept_with_token(
    listener: &UnixListener,
    port: u32,
    token: &[u8],
) -> Result<UnixStream, ContainerError> {
    use tokio::io::AsyncReadExt;
    loop {
        let (mut stream, _) = listener
            .accept()
            .await
            .map_err(|e| ContainerError::Stdio(e.to_string()))?;
        let mut got = vec![0u8; token.len()];
        let read = tokio::time::timeout(STDIO_TOKEN_TIMEOUT, stream.read_exact(&mut got)).await;
        // Compared in full whatever matches first: no timing hint about a prefix.
        let same = got.len() == token.len()
            && got.iter().zip(token).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0;
        match read {
            Ok(Ok(_)) if same => return Ok(stream),
            _ => tracing::warn!(
                port,
                "closed a connection to a stdio port that did not present the stream's token"
            ),
        }
    }
}

/// Guest path of a container's files in the share.
fn guest_dir(id: &str) -> PathBuf {
    Path::new(GUEST_SHARE_DIR).join(id)
}

impl Sandbox {
    /// Wait until a container of this sandbox is killed by the OOM killer (its cgroup's
    /// `memory.events` oom_kill count rose) and return its ID. Each kill is reported once;
    /// keep one call outstanding to see them all.
    pub async fn wait_oom(&self) -> Result<String, ContainerError> {
        Ok(self.agent().wait_oom_event().await?)
    }

    /// Create a container: bind its root filesystem and volumes into the share, open its
    /// stdio streams, and have the agent set it up (its command does not run yet). Returns the
    /// streams and the guest PID of its init.
    pub async fn create_container(
        &self,
        config: &ContainerConfig,
    ) -> Result<(Stdio, u32), ContainerError> {
        let share = self
            .share_dir()
            .ok_or_else(|| ContainerError::Spec("the sandbox has no share".into()))?;
        let SharedContainer { spec_json, rootfs } = share_container(&share, config)?;
        let terminal = config
            .spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let pending = PendingStdio::bind(&self.vsock_uds(), config.stdin, !terminal)?;
        let ports = pending.ports.clone();
        let create = self
            .agent()
            .create_container(&config.id, spec_json, rootfs, ports);
        // The agent connects the streams before CreateContainer returns: accept meanwhile.
        let accepting = tokio::spawn(pending_accept(pending));
        let created = create.await;
        tracing::debug!(id = %config.id, ok = created.is_ok(), "agent answered CreateContainer");
        match created {
            Ok(pid) => Ok((
                accepting
                    .await
                    .map_err(|e| ContainerError::Stdio(e.to_string()))??,
                pid,
            )),
            Err(e) => {
                accepting.abort();
                Err(e.into())
            }
        }
    }
}

/// Another process to run in a container. What is `None` is inherited from the container's
/// own process, as `docker exec` does.
#[derive(Debug, Clone, Default)]
pub struct ExecConfig {
    /// The exec's ID (unique in the container).
    pub exec_id: String,
    /// Command and arguments.
    pub args: Vec<String>,
    /// `KEY=VALUE` additions/replacements to the container's environment.
    pub env: Vec<String>,
    /// Working directory (default: the container's).
    pub cwd: Option<String>,
    /// `UID[:GID]` (default: the container's user).
    pub user: Option<String>,
    /// Give it a terminal.
    pub terminal: bool,
    /// Open a stdin stream.
    pub stdin: bool,
}

impl ExecConfig {
    /// The OCI process to run: the container's `base` with this exec's changes.
    pub fn process(&self, base: Option<&Process>) -> Result<Process, SpecError> {
        let mut process = base.cloned().unwrap_or_default();
        if base.is_none() {
            process.set_cwd("/".into());
        }
        process.set_args(Some(self.args.clone()));
        process.set_terminal(Some(self.terminal));
        let mut env = process.env().clone().unwrap_or_default();
        // A terminal needs a TERM, as `docker exec -t` gives it.
        if self.terminal && !env.iter().any(|e| e.starts_with("TERM=")) {
            env.push("TERM=xterm".into());
        }
        process.set_env(Some(oci::merge_env(env, &self.env)?));
        if let Some(cwd) = &self.cwd {
            process.set_cwd(oci::absolute_cwd(cwd)?.into());
        }
        if let Some(user) = &self.user {
            let (uid, gid) = oci::parse_user(user)?;
            process.set_user(
                UserBuilder::default()
                    .uid(uid)
                    .gid(gid)
                    .build()
                    .map_err(|e| SpecError::Invalid(e.to_string()))?,
            );
        }
        // An exec never inherits the init process's console size or OOM score adjustments
        // it did not ask for; everything else (capabilities, rlimits, no_new_privs,
        // AppArmor/SELinux labels) it does, as runc's exec does.
        process.set_console_size(None);
        Ok(process)
    }
}

/// A container: its record under the state root, and the calls that move it through its
/// lifecycle (create → start → wait → remove), each recorded as it happens.
#[derive(Debug)]
pub struct Container {
    layout: Layout,
    state: ContainerState,
}

impl Container {
    /// Claim `id` for a new container of sandbox `sandbox_id` (its record says `creating`).
    /// Fails if a container with this ID exists.
    pub fn claim(
        layout: &Layout,
        id: &str,
        sandbox_id: &str,
        process: Option<Process>,
    ) -> Result<Self, ContainerError> {
        let state = ContainerState::new(id, sandbox_id, process);
        layout.create_container(&state)?;
        Ok(Self {
            layout: layout.clone(),
            state,
        })
    }

    /// The recorded container `id`.
    pub fn load(layout: &Layout, id: &str) -> Result<Self, ContainerError> {
        Ok(Self {
            layout: layout.clone(),
            state: layout.load(id)?,
        })
    }

    /// Its record.
    pub fn state(&self) -> &ContainerState {
        &self.state
    }

    /// Its ID.
    pub fn id(&self) -> &str {
        &self.state.id
    }

    /// Whether it joined another container's sandbox (a member of a pod) instead of running
    /// in a sandbox of its own.
    pub fn is_member(&self) -> bool {
        self.state.sandbox_id != self.state.id
    }

    /// Its directory under the state root (the record; the CLI keeps logs there too).
    pub fn dir(&self) -> PathBuf {
        self.layout.container(&self.state.id)
    }

    /// Name the host process that holds its sandbox: when that process is gone, the
    /// container reads as stopped.
    pub fn set_owner(&mut self, owner: ProcessRef) -> Result<(), ContainerError> {
        self.state.owner = Some(owner);
        self.save()
    }

    /// Note the OCI bundle it is created from.
    pub fn set_bundle(&mut self, bundle: PathBuf) -> Result<(), ContainerError> {
        self.state.bundle = Some(bundle);
        self.save()
    }

    /// The `linux.cgroupsPath` of the bundle it was created from, if it still has one.
    fn bundle_cgroups_path(&self) -> Option<String> {
        let config = self.state.bundle.as_ref()?.join("config.json");
        let spec = Spec::load(config).ok()?;
        let path = spec.linux().as_ref()?.cgroups_path().clone()?;
        Some(path.display().to_string())
    }

    /// Note the image it is made from and the scratch directory of its overlay root
    /// filesystem, which its removal unmounts and removes.
    pub fn set_image(&mut self, image: String, scratch: PathBuf) -> Result<(), ContainerError> {
        self.state.image = Some(image);
        self.state.scratch = Some(scratch);
        self.save()
    }

    fn save(&self) -> Result<(), ContainerError> {
        Ok(self.layout.save(&self.state)?)
    }

    fn ensure(&self, allowed: &[Status], what: &'static str) -> Result<(), ContainerError> {
        if allowed.contains(&self.state.status) {
            Ok(())
        } else {
            Err(ContainerError::WrongState {
                id: self.state.id.clone(),
                status: self.state.status.as_str(),
                what,
            })
        }
    }

    /// Set the container up in `sandbox` (its command does not run yet): share its root
    /// filesystem and volumes, open its stdio streams. A command that does not exist or
    /// cannot run fails here ([`ContainerError::command_status`] tells runc's status); the
    /// exit code is then recorded and the container reads as stopped.
    pub async fn create(
        &mut self,
        sandbox: &Sandbox,
        config: &ContainerConfig,
    ) -> Result<Stdio, ContainerError> {
        self.ensure(&[Status::Creating], "it was created already")?;
        self.state.vmm = sandbox.vmm();
        self.state.process = config.spec.process().clone();
        self.state.annotations = config
            .spec
            .annotations()
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match sandbox.create_container(config).await {
            Ok((stdio, guest_pid)) => {
                self.state.status = Status::Created;
                self.state.guest_pid = Some(guest_pid);
                self.save()?;
                Ok(stdio)
            }
            Err(e) => {
                self.state.status = Status::Stopped;
                self.state.exit_code = e.command_status().map(i32::from);
                self.unshare(sandbox);
                let _ = self.save();
                Err(e)
            }
        }
    }

    /// Run its command.
    pub async fn start(&mut self, sandbox: &Sandbox) -> Result<(), ContainerError> {
        self.ensure(
            &[Status::Created],
            "only a created container can be started",
        )?;
        sandbox.agent().start_container(&self.state.id).await?;
        self.state.status = Status::Running;
        self.save()
    }

    /// Wait for its command to exit; records the exit status.
    pub async fn wait(&mut self, sandbox: &Sandbox) -> Result<ExitStatus, ContainerError> {
        let status: ExitStatus = sandbox
            .agent()
            .wait_process(&self.state.id, "")
            .await?
            .into();
        self.record_exit(status.code)?;
        Ok(status)
    }

    /// Record that it stopped with `code` (when the sandbox ended it, say).
    pub fn record_exit(&mut self, code: i32) -> Result<(), ContainerError> {
        self.state.status = Status::Stopped;
        self.state.exit_code = Some(code);
        self.save()
    }

    /// Send `signal` to its init (`all`: to every process in it).
    pub async fn signal(
        &self,
        sandbox: &Sandbox,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        self.ensure(
            &[Status::Created, Status::Running, Status::Paused],
            "there is nothing to signal",
        )?;
        let signal = u32::try_from(signal)
            .map_err(|_| ContainerError::Spec(format!("invalid signal {signal}")))?;
        Ok(sandbox
            .agent()
            .signal_process(&self.state.id, "", signal, all)
            .await?)
    }

    /// Run `process` in it as exec `exec_id` (a whole OCI process: an [`ExecConfig`]'s, or
    /// what the OCI runtime CLI's `exec --process` reads); `stdin`: open a stdin stream.
    /// Wait for it with `sandbox.agent().wait_process(id, exec_id)`.
    pub async fn run_process(
        &self,
        sandbox: &Sandbox,
        exec_id: &str,
        process: &Process,
        stdin: bool,
    ) -> Result<Stdio, ContainerError> {
        self.ensure(&[Status::Running], "exec needs a running container")?;
        let json =
            serde_json::to_string(process).map_err(|e| ContainerError::Spec(e.to_string()))?;
        exec_process(
            sandbox.agent(),
            &sandbox.vsock_uds(),
            &self.state.id,
            exec_id,
            json,
            stdin,
            process.terminal() == Some(true),
        )
        .await
    }

    /// Its cgroup statistics.
    pub async fn stats(&self, sandbox: &Sandbox) -> Result<Stats, ContainerError> {
        self.ensure(
            &[Status::Created, Status::Running, Status::Paused],
            "it has no cgroup to read",
        )?;
        Ok(sandbox.agent().stats(&self.state.id).await?.into())
    }

    /// Freeze every process of a running container (cgroup v2 freezer in the guest); it
    /// reads as paused once the guest says all are frozen. A paused container can still be
    /// killed.
    pub async fn pause(&mut self, sandbox: &Sandbox) -> Result<(), ContainerError> {
        self.pause_with(sandbox.agent()).await
    }

    async fn pause_with(&mut self, agent: &AgentClient) -> Result<(), ContainerError> {
        self.ensure(&[Status::Running], "only a running container can be paused")?;
        agent.pause_container(&self.state.id).await?;
        self.state.status = Status::Paused;
        self.save()
    }

    /// Thaw a paused container.
    pub async fn resume(&mut self, sandbox: &Sandbox) -> Result<(), ContainerError> {
        self.resume_with(sandbox.agent()).await
    }

    async fn resume_with(&mut self, agent: &AgentClient) -> Result<(), ContainerError> {
        self.ensure(&[Status::Paused], "only a paused container can be resumed")?;
        agent.resume_container(&self.state.id).await?;
        self.state.status = Status::Running;
        self.save()
    }

    /// Change its cgroup limits in the guest (what `resources` leaves `None` stays). A bad
    /// value is refused by the agent, naming the field, before any limit changes.
    pub async fn update(
        &self,
        sandbox: &Sandbox,
        resources: &Resources,
    ) -> Result<(), ContainerError> {
        self.update_with(sandbox.agent(), resources).await
    }

    async fn update_with(
        &self,
        agent: &AgentClient,
        resources: &Resources,
    ) -> Result<(), ContainerError> {
        self.ensure(
            &[Status::Created, Status::Running, Status::Paused],
            "only a live container can be updated",
        )?;
        Ok(agent.update_container(&self.state.id, resources).await?)
    }

    /// Remove it from `sandbox` (the agent kills what is left of it) and unmount its root
    /// filesystem and volumes from the share at once; then forget its record.
    pub async fn remove(self, sandbox: &Sandbox) -> Result<(), ContainerError> {
        let removed = sandbox.agent().remove_container(&self.state.id).await;
        self.unshare(sandbox);
        removed?;
        self.forget()
    }

    fn unshare(&self, sandbox: &Sandbox) {
        if let Some(share) = sandbox.share_dir() {
            let dir = share.join(&self.state.id);
            if dir.exists() {
                if let Err(e) = share::remove(&dir) {
                    tracing::warn!("unsharing container {}: {e}", self.state.id);
                }
            }
        }
    }

    /// Forget its record (and whatever else is in its directory).
    pub fn forget(self) -> Result<(), ContainerError> {
        Ok(self.layout.remove_container(&self.state.id)?)
    }

    /// Take it out of `sandbox`'s microVM (the agent kills what is left of it) and unmount
    /// its root filesystem and volumes from the share, keeping its record: a pod member
    /// whose command exited leaves the microVM it shares at once.
    pub async fn leave(&self, sandbox: &Sandbox) -> Result<(), ContainerError> {
        let removed = sandbox.agent().remove_container(&self.state.id).await;
        self.unshare(sandbox);
        Ok(removed?)
    }

    /// Delete a container the CLI runs: a live one only with `force`, which kills its owner
    /// (the host process that stands for it); its record is forgotten.
    ///
    /// A container that owns its sandbox (a pod of one, or a pod's sandbox container) takes
    /// its microVM with it: the VMM is killed, the sandbox's mounts and directory removed.
    /// Containers that joined that microVM must be deleted first (runc-like engines, CRI-O
    /// among them, delete a pod's containers before its sandbox): otherwise the error names
    /// them, unless `with_members`, which deletes them first as if forced.
    ///
    /// A member of a pod (see [`crate::pod`]) leaves the microVM running: only it is taken out
    /// of the guest, its binds unmounted and its files in the share removed.
    pub async fn delete(self, force: bool, with_members: bool) -> Result<(), ContainerError> {
        if self.state.status != Status::Stopped && !force {
            return Err(ContainerError::WrongState {
                id: self.state.id.clone(),
                status: self.state.status.as_str(),
                what: "stop it first, or force the removal (brig rm -f)",
            });
        }
        if self.is_member() {
            return self.delete_member().await;
        }
        let members = crate::pod::members(&self.layout, &self.state.id, &self.state.sandbox_id);
        if !members.is_empty() {
            if !with_members {
                return Err(crate::pod::PodError::HasMembers {
                    sandbox: self.state.id.clone(),
                    members: members.join(", "),
                }
                .into());
            }
            for id in members {
                match Container::load(&self.layout, &id) {
                    Ok(member) => member.delete_member().await?,
                    Err(ContainerError::State(StateError::NotFound { .. })) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // The VM's own process (the VMM's child, in a PID namespace of its own), noted while
        // the VMM still names it: killed with the owner, it is reaped by whoever adopts it,
        // and is waited for below like the owner.
        let mut gone_before_return: Vec<ProcessRef> =
            sandbox::vm_processes(self.layout.root(), &self.state.sandbox_id);
        self.kill_owner();
        sandbox::remove_sandbox(self.layout.root(), &self.state.sandbox_id)?;
        gone_before_return.extend(self.state.owner);
        wait_gone(&gone_before_return).await;
        // The cgroup its owner made for the microVM: an owner that was killed did not
        // remove it.
        if let Some(path) = self.bundle_cgroups_path() {
            crate::cgroup::remove_path(&path);
        }
        self.forget()
    }

    /// A live container's owner gets SIGKILL.
    fn kill_owner(&self) {
        if self.state.status != Status::Stopped {
            if let Some(owner) = self.state.owner {
                let _ = owner.signal(libc::SIGKILL);
            }
        }
    }

    /// Delete a member of a pod (as if forced): its owner killed, it taken out of the
    /// microVM if that still runs, its binds and share files removed, its record forgotten.
    async fn delete_member(self) -> Result<(), ContainerError> {
        self.kill_owner();
        // Dead is enough (a zombie its parent has not reaped yet has left its cgroup and
        // holds nothing of the pod's).
        wait_until(|| !self.state.owner.is_some_and(|o| o.alive())).await;
        let sandbox_id = &self.state.sandbox_id;
        if !sandbox::vm_processes(self.layout.root(), sandbox_id).is_empty() {
            match Sandbox::open(self.layout.root(), sandbox_id).await {
                // An owner whose command exited took it out of the guest already.
                Ok(sandbox) => {
                    if let Err(e) = sandbox.agent().remove_container(&self.state.id).await {
                        tracing::debug!(id = %self.state.id, "removing from the microVM: {e}");
                    }
                }
                Err(e) => tracing::warn!(
                    "reaching sandbox {sandbox_id} to remove container {}: {e}",
                    self.state.id
                ),
            }
        }
        let shared = sandbox::shared_dir(&self.layout.sandbox(sandbox_id)).join(&self.state.id);
        share::remove(&shared)?;
        if let Some(path) = self.bundle_cgroups_path() {
            crate::cgroup::remove_path(&path);
        }
        self.forget()
    }
}

/// Wait (up to 10 s) until every one of `processes` is gone from the process table.
async fn wait_gone(processes: &[ProcessRef]) {
    wait_until(|| processes.iter().all(|p| p.gone())).await;
}

/// Wait until `done` holds, checking every 10 ms, for at most 10 s.
async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
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
pub fn share_container(
    share: &Path,
    config: &ContainerConfig,
) -> Result<SharedContainer, ContainerError> {
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
    oci::guest_hooks(&mut spec, config.bundle.as_deref());
    // The guest's network namespace is the sandbox's network (the pod's, through its TAP,
    // or loopback only): every container of the sandbox shares it, as a pod's containers
    // share the pause container's, instead of an empty one of its own.
    if let Some(namespaces) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    {
        namespaces.retain(|ns| ns.typ() != oci_spec::runtime::LinuxNamespaceType::Network);
    }
    let spec_json =
        serde_json::to_string(&spec).map_err(|e| ContainerError::Spec(e.to_string()))?;
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
    match agent
        .exec_process(container_id, exec_id, process_json, ports)
        .await
    {
        Ok(()) => accepting
            .await
            .map_err(|e| ContainerError::Stdio(e.to_string()))?,
        Err(e) => {
            accepting.abort();
            Err(e.into())
        }
    }
}

async fn pending_accept(pending: PendingStdio) -> Result<Stdio, ContainerError> {
    let paths: Vec<PathBuf> = pending
        .listeners
        .iter()
        .map(|(_, p, _)| p.clone())
        .collect();
    let result = pending.accept().await;
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use brig_protocols::agent::{
        Empty, PauseContainerRequest, ResumeContainerRequest, UpdateContainerRequest,
    };
    use brig_protocols::agent_ttrpc_async::{create_agent, Agent};

    use super::*;

    #[tokio::test]
    async fn a_stdio_port_keeps_only_the_connection_with_the_token() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("brig-stdio-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vsock.sock_1234");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let token = stdio_token().unwrap();
        assert_eq!(token.len(), STDIO_TOKEN_LEN);
        // A racer that guesses, one that says too little, and then the agent.
        let mut wrong = UnixStream::connect(&path).await.unwrap();
        wrong.write_all(&[0u8; STDIO_TOKEN_LEN]).await.unwrap();
        wrong.write_all(b"racer").await.unwrap();
        let mut short = UnixStream::connect(&path).await.unwrap();
        short.write_all(&token[..4]).await.unwrap();
        short.shutdown().await.unwrap();
        let mut agent = UnixStream::connect(&path).await.unwrap();
        agent.write_all(&token).await.unwrap();
        agent.write_all(b"the real stream").await.unwrap();
        agent.shutdown().await.unwrap();

        let mut stream = accept_with_token(&listener, 1234, &token).await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"the real stream");
        // The racer was hung up on.
        let mut rest = Vec::new();
        assert_eq!(wrong.read_to_end(&mut rest).await.unwrap_or(0), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An agent that records the pause/resume/update calls it gets, and refuses updates
    /// the way brig-agent does.
    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    #[async_trait::async_trait]
    impl Agent for Recorder {
        async fn pause_container(
            &self,
            _: &::ttrpc::r#async::TtrpcContext,
            req: PauseContainerRequest,
        ) -> ::ttrpc::Result<Empty> {
            self.0
                .lock()
                .unwrap()
                .push(format!("pause {}", req.container_id));
            Ok(Empty::new())
        }

        async fn resume_container(
            &self,
            _: &::ttrpc::r#async::TtrpcContext,
            req: ResumeContainerRequest,
        ) -> ::ttrpc::Result<Empty> {
            self.0
                .lock()
                .unwrap()
                .push(format!("resume {}", req.container_id));
            Ok(Empty::new())
        }

        async fn update_container(
            &self,
            _: &::ttrpc::r#async::TtrpcContext,
            req: UpdateContainerRequest,
        ) -> ::ttrpc::Result<Empty> {
            let r = req.resources.clone().unwrap_or_default();
            if r.pids_limit == Some(-2) {
                return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    "invalid pids_limit: -2",
                )));
            }
            self.0.lock().unwrap().push(format!(
                "update {} memory {:?} pids {:?}",
                req.container_id, r.memory_limit, r.pids_limit
            ));
            Ok(Empty::new())
        }
    }

    async fn agent(
        name: &str,
    ) -> (
        AgentClient,
        ttrpc::asynchronous::Server,
        Arc<Mutex<Vec<String>>>,
    ) {
        let path = std::env::temp_dir().join(format!(
            "brig-container-test-{name}-{}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let addr = format!("unix://{}", path.display());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&addr)
            .unwrap()
            .register_service(create_agent(Arc::new(Recorder(Arc::clone(&calls)))));
        server.start().await.unwrap();
        let client = ttrpc::asynchronous::Client::connect(&addr).await.unwrap();
        (AgentClient::from_ttrpc(client), server, calls)
    }

    fn layout(name: &str) -> Layout {
        let root =
            std::env::temp_dir().join(format!("brig-container-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        Layout::new(&root)
    }

    fn container_in(layout: &Layout, status: Status) -> Container {
        let mut c = Container::claim(layout, "c1", "c1", None).unwrap();
        c.state.owner = Some(ProcessRef::current());
        c.state.status = status;
        c.save().unwrap();
        c
    }

    #[tokio::test]
    async fn pause_and_resume_move_a_running_container_and_persist_it() {
        let layout = layout("pause");
        let (agent, mut server, calls) = agent("pause").await;
        let mut c = container_in(&layout, Status::Running);

        c.pause_with(&agent).await.unwrap();
        assert_eq!(c.state().status, Status::Paused);
        // Another process (`brig ps`) sees it paused.
        assert_eq!(layout.load("c1").unwrap().status, Status::Paused);

        // Pausing twice is a clear error, and the agent is not asked.
        let err = c.pause_with(&agent).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "container c1 is paused: only a running container can be paused"
        );

        c.resume_with(&agent).await.unwrap();
        assert_eq!(layout.load("c1").unwrap().status, Status::Running);
        let err = c.resume_with(&agent).await.unwrap_err().to_string();
        assert_eq!(
            err,
            "container c1 is running: only a paused container can be resumed"
        );
        assert_eq!(*calls.lock().unwrap(), vec!["pause c1", "resume c1"]);
        let _ = server.shutdown().await;
        let _ = std::fs::remove_dir_all(layout.root());
    }

    #[tokio::test]
    async fn only_a_running_container_can_be_paused() {
        let layout = layout("states");
        let (agent, mut server, calls) = agent("states").await;
        for status in [Status::Creating, Status::Created, Status::Stopped] {
            let _ = std::fs::remove_dir_all(layout.root());
            let mut c = container_in(&layout, status);
            let err = c.pause_with(&agent).await.unwrap_err();
            assert!(
                matches!(err, ContainerError::WrongState { .. }),
                "{status:?}: {err}"
            );
            assert_eq!(layout.load("c1").unwrap().status, status);
            let err = c.resume_with(&agent).await.unwrap_err();
            assert!(matches!(err, ContainerError::WrongState { .. }), "{err}");
        }
        assert!(calls.lock().unwrap().is_empty());
        let _ = server.shutdown().await;
        let _ = std::fs::remove_dir_all(layout.root());
    }

    #[tokio::test]
    async fn update_reaches_the_agent_and_its_refusal_comes_back_as_invalid_argument() {
        let layout = layout("update");
        let (agent, mut server, calls) = agent("update").await;
        let c = container_in(&layout, Status::Paused);
        let resources = Resources {
            memory_limit: Some(64 << 20),
            pids_limit: Some(5),
            ..Default::default()
        };
        c.update_with(&agent, &resources).await.unwrap();
        assert_eq!(
            *calls.lock().unwrap(),
            vec!["update c1 memory Some(67108864) pids Some(5)"]
        );
        let bad = Resources {
            pids_limit: Some(-2),
            ..Default::default()
        };
        match c.update_with(&agent, &bad).await.unwrap_err() {
            ContainerError::Agent(e) => {
                assert_eq!(e.kind(), Some(ErrorKind::InvalidArgument));
                assert!(e.to_string().contains("pids_limit"), "{e}");
            }
            other => panic!("{other}"),
        }
        let _ = std::fs::remove_dir_all(layout.root());
        let stopped = container_in(&layout, Status::Stopped);
        assert!(matches!(
            stopped.update_with(&agent, &resources).await,
            Err(ContainerError::WrongState { .. })
        ));
        let _ = server.shutdown().await;
        let _ = std::fs::remove_dir_all(layout.root());
    }
}

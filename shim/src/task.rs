//! The task API (containerd's `containerd.task.v2.Task`) onto the runtime core: one pod,
//! one microVM, any number of containers and execs in it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use brig_runtime::agent::ErrorKind;
use brig_runtime::container::{exec_process, Container, ContainerConfig, ContainerError, Volume};
use brig_runtime::resources::Resources;
use brig_runtime::sandbox::SandboxSpec;
use brig_runtime::state::{Layout, ProcessRef, Status};
use brig_runtime::{RuntimeConfig, Sandbox};
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::Flags;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, Code};
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, Process, Spec};
use tokio::sync::{watch, Mutex, Notify};

use crate::bootstrap::namespace_root;
use crate::io::{Relay, StdioPaths};

type TtrpcResult<T> = ttrpc::Result<T>;

/// The largest JSON document taken from containerd in one request (an exec's process, an
/// update's resources).
const MAX_REQUEST_JSON: usize = 1 << 20;
/// The exit status reported when the microVM went away under a process.
const LOST_STATUS: u32 = 255;

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

/// The JSON document containerd sent in `any` (absent counts as empty), bounded by
/// [`MAX_REQUEST_JSON`] before it is parsed; `what` names it in errors.
fn request_json<T: serde::de::DeserializeOwned>(
    any: Option<&Any>,
    what: &str,
) -> Result<T, ttrpc::Error> {
    let value = any.map(|a| a.value.as_slice()).unwrap_or_default();
    if value.len() > MAX_REQUEST_JSON {
        return Err(err(
            Code::INVALID_ARGUMENT,
            format!("{what} is larger than {MAX_REQUEST_JSON} bytes"),
        ));
    }
    serde_json::from_slice(value).map_err(|e| err(Code::INVALID_ARGUMENT, format!("{what}: {e}")))
}

fn not_found(what: &str) -> ttrpc::Error {
    err(Code::NOT_FOUND, format!("{what} not found"))
}

/// A runtime error as containerd should see it: its code says what kind of failure it is.
fn runtime_err(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::WrongState { .. } => Code::FAILED_PRECONDITION,
        ContainerError::Spec(_) => Code::INVALID_ARGUMENT,
        ContainerError::Agent(a) => match a.kind() {
            Some(ErrorKind::NotFound) => Code::NOT_FOUND,
            Some(ErrorKind::PermissionDenied) => Code::PERMISSION_DENIED,
            Some(ErrorKind::InvalidArgument) => Code::INVALID_ARGUMENT,
            Some(ErrorKind::AlreadyExists) => Code::ALREADY_EXISTS,
            Some(ErrorKind::FailedPrecondition) => Code::FAILED_PRECONDITION,
            Some(ErrorKind::Transport) => Code::UNAVAILABLE,
            _ => Code::UNKNOWN,
        },
        _ => Code::UNKNOWN,
    };
    err(code, e.to_string())
}

/// Now, as containerd's timestamps.
pub fn now() -> Timestamp {
    containerd_shim::util::timestamp().unwrap_or_default()
}

/// Unmount a container's root filesystem from its bundle (lazily: nothing may hold it now).
pub fn unmount_rootfs(rootfs: &Path) {
    match nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => tracing::warn!("unmounting {}: {e}", rootfs.display()),
    }
}

#[derive(Debug, Clone)]
struct Exited {
    code: u32,
    at: Timestamp,
}

/// A process (a container's init, or an exec).
struct Proc {
    paths: StdioPaths,
    /// An exec's process, until it starts.
    spec: Option<Process>,
    started: bool,
    /// Its stdio copying, until the process starts and its watcher takes it.
    relay: Option<Relay>,
    close_stdin: Option<Arc<Notify>>,
    exit: watch::Sender<Option<Exited>>,
}

impl Proc {
    fn new(paths: StdioPaths, spec: Option<Process>) -> Self {
        Self {
            paths,
            spec,
            started: false,
            relay: None,
            close_stdin: None,
            exit: watch::channel(None).0,
        }
    }

    fn exited(&self) -> Option<Exited> {
        self.exit.borrow().clone()
    }

    fn status(&self) -> api::Status {
        match (self.started, self.exited()) {
            (_, Some(_)) => api::Status::STOPPED,
            (true, None) => api::Status::RUNNING,
            (false, None) => api::Status::CREATED,
        }
    }
}

struct Ctr {
    container: Container,
    bundle: PathBuf,
    rootfs_mounted: bool,
    init: Proc,
    execs: HashMap<String, Proc>,
    /// A TaskOOM was published for it.
    oom_published: bool,
}

impl Ctr {
    fn proc(&self, exec_id: &str) -> TtrpcResult<&Proc> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs.get(exec_id).ok_or_else(|| {
            not_found(&format!(
                "exec {exec_id:?} of container {}",
                self.container.id()
            ))
        })
    }
}

#[derive(Default)]
struct Pod {
    config: Option<RuntimeConfig>,
    sandbox: Option<Arc<Sandbox>>,
    /// The pod's host cgroup the shim (and so the VMM) joined, if the sandbox named one.
    cgroup: Option<brig_runtime::cgroup::PodCgroup>,
    containers: HashMap<String, Ctr>,
}

impl Pod {
    fn ctr(&self, id: &str) -> TtrpcResult<&Ctr> {
        self.containers
            .get(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }

    fn ctr_mut(&mut self, id: &str) -> TtrpcResult<&mut Ctr> {
        self.containers
            .get_mut(id)
            .ok_or_else(|| not_found(&format!("container {id}")))
    }
}

struct Inner {
    namespace: String,
    /// The pod's ID: the sandbox's (and the microVM's).
    group: String,
    publisher: Option<RemotePublisher>,
    exit: Arc<ExitSignal>,
    pod: Mutex<Pod>,
}

/// The shim's task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    /// A service for the pod `flags.id`, publishing events to containerd at `ttrpc_address`
    /// (CRI-O gives none: then events are only logged).
    pub async fn new(flags: &Flags, ttrpc_address: &str) -> anyhow::Result<Self> {
        let publisher = if ttrpc_address.is_empty() {
            tracing::info!("no TTRPC_ADDRESS: events are logged, not published");
            None
        } else {
            Some(RemotePublisher::new(ttrpc_address).await.map_err(|e| {
                anyhow::anyhow!("connecting to containerd's events at {ttrpc_address}: {e}")
            })?)
        };
        Ok(Self {
            inner: Arc::new(Inner {
                namespace: flags.namespace.clone(),
                group: flags.id.clone(),
                publisher,
                exit: Arc::new(ExitSignal::default()),
                pod: Mutex::new(Pod::default()),
            }),
        })
    }

    /// Set when the shim should end (after Shutdown of an empty pod).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.inner.exit.clone()
    }
}

impl Inner {
    async fn publish<E: Event + MessageDyn + 'static>(&self, event: E) {
        let topic = event.topic();
        match &self.publisher {
            Some(p) => {
                if let Err(e) = p
                    .publish(Default::default(), &topic, &self.namespace, Box::new(event))
                    .await
                {
                    tracing::warn!("publishing {topic}: {e}");
                }
            }
            None => tracing::info!(%topic, "event"),
        }
    }

    /// A process ended: record it, tell the waiters, publish the exit.
    async fn process_exited(&self, id: &str, exec_id: &str, code: u32, oom: bool) {
        let at = now();
        let pid;
        let mut publish_oom = false;
        {
            let mut pod = self.pod.lock().await;
            pid = vmm_pid(&pod);
            let Some(ctr) = pod.containers.get_mut(id) else {
                return;
            };
            let proc = if exec_id.is_empty() {
                if let Err(e) = ctr.container.record_exit(code as i32) {
                    tracing::warn!("recording the exit of {id}: {e}");
                }
                // The guest's OOM event may come later than the exit: CRI reads a container
                // as OOMKilled only if TaskOOM comes first.
                publish_oom = oom && !std::mem::replace(&mut ctr.oom_published, true);
                &ctr.init
            } else {
                match ctr.execs.get(exec_id) {
                    Some(p) => p,
                    None => return,
                }
            };
            proc.exit.send_replace(Some(Exited {
                code,
                at: at.clone(),
            }));
        }
        if oom {
            tracing::debug!(%id, "the process was OOM-killed");
        }
        if publish_oom {
            self.publish(TaskOOM {
                container_id: id.into(),
                ..Default::default()
            })
            .await;
        }
        self.publish(TaskExit {
            container_id: id.into(),
            id: if exec_id.is_empty() {
                id.into()
            } else {
                exec_id.into()
            },
            pid,
            exit_status: code,
            exited_at: MessageField::some(at),
            ..Default::default()
        })
        .await;
    }

    /// Wait for a started process in the background; its exit is recorded when its output
    /// is copied (so a client that reads until the exit gets all of it).
    fn watch(self: &Arc<Self>, sandbox: &Sandbox, id: &str, exec_id: &str, mut relay: Relay) {
        let agent = sandbox.agent().clone();
        let inner = self.clone();
        let (id, exec_id) = (id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let (code, oom) = match agent.wait_process(&id, &exec_id).await {
                Ok(w) => (
                    u32::try_from(w.exit_status).unwrap_or(LOST_STATUS),
                    w.oom_killed,
                ),
                Err(e) => {
                    tracing::warn!("waiting for {id} {exec_id}: {e}");
                    (LOST_STATUS, false)
                }
            };
            relay.drain().await;
            inner.process_exited(&id, &exec_id, code, oom).await;
        });
    }
}

impl Inner {
    /// Forward the guest's OOM kills as TaskOOM events for as long as the microVM runs.
    fn watch_oom(self: &Arc<Self>, sandbox: &Sandbox) {
        let agent = sandbox.agent().clone();
        let inner = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Ok(id) = agent.wait_oom_event().await {
                let Some(inner) = inner.upgrade() else { return };
                if let Some(ctr) = inner.pod.lock().await.containers.get_mut(&id) {
                    ctr.oom_published = true;
                }
                inner
                    .publish(TaskOOM {
                        container_id: id,
                        ..Default::default()
                    })
                    .await;
            }
        });
    }
}

fn vmm_pid(pod: &Pod) -> u32 {
    pod.sandbox.as_ref().and_then(|s| s.vmm_pid()).unwrap_or(0)
}

fn sandbox_of(pod: &Pod) -> TtrpcResult<Arc<Sandbox>> {
    pod.sandbox
        .clone()
        .ok_or_else(|| err(Code::FAILED_PRECONDITION, "the pod has no microVM yet"))
}

/// What the guest can use of a container's spec, and the host paths it must be shared.
///
/// Namespaces as `brig_runtime::pod::guest_namespaces` gives them: CRI joins a pod's
/// containers to the sandbox's namespaces at `/proc/PID/ns/…`, PID being the sandbox task's
/// PID as the shim reported it (the VMM's), so `join` = (VMM's host PID, the sandbox
/// container init's guest PID). Bind mounts of host files and directories (CRI's /etc/hosts,
/// /etc/resolv.conf, Kubernetes volumes) become volumes, shared into the guest over virtio-fs.
fn guest_spec(mut spec: Spec, join: Option<(u32, u32)>) -> (Spec, Vec<Volume>) {
    brig_runtime::pod::guest_namespaces(&mut spec, join);
    let volumes = Volume::take_host_binds(&mut spec);
    (spec, volumes)
}

/// The network namespace a pod's sandbox task names (`linux.namespaces`, type network, with
/// a path): CNI's, set up before the task is created. Later containers name the pod's.
fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// The whole pod's limits, which containerd's CRI (1.7 and later) puts on the sandbox as
/// annotations (the sum of its containers' limits): the VM is sized for all of them.
fn fit_pod(sandbox: &mut SandboxSpec, spec: &Spec) {
    let Some(annotations) = spec.annotations().as_ref() else {
        return;
    };
    let number = |key: &str| {
        annotations
            .get(key)
            .and_then(|v| v.trim().parse::<i64>().ok())
    };
    sandbox.fit_limits(
        number("io.kubernetes.cri.sandbox-memory"),
        number("io.kubernetes.cri.sandbox-cpu-quota"),
        number("io.kubernetes.cri.sandbox-cpu-period").and_then(|p| u64::try_from(p).ok()),
    );
}

/// Mount what containerd gives as the rootfs on `bundle/rootfs`; `false` when containerd gave
/// no mounts (the bundle's own rootfs directory is used as it is).
async fn mount_rootfs(
    mounts: &[api::Mount],
    bundle: &Path,
    spec: &Spec,
) -> TtrpcResult<(PathBuf, bool)> {
    match mounts {
        [] => {
            let root = spec
                .root()
                .as_ref()
                .map(|r| r.path().clone())
                .unwrap_or_else(|| PathBuf::from("rootfs"));
            let root = if root.is_absolute() {
                root
            } else {
                bundle.join(root)
            };
            if !root.is_dir() {
                return Err(err(
                    Code::INVALID_ARGUMENT,
                    format!(
                        "no rootfs mounts and no root directory at {}",
                        root.display()
                    ),
                ));
            }
            Ok((root, false))
        }
        [m] => {
            let target = bundle.join("rootfs");
            std::fs::create_dir_all(&target).map_err(|e| {
                err(
                    Code::INTERNAL,
                    format!("creating {}: {e}", target.display()),
                )
            })?;
            containerd_shim::asynchronous::util::mount_rootfs(m, &target)
                .await
                .map_err(|e| {
                    err(
                        Code::INTERNAL,
                        format!(
                            "mounting the rootfs ({} {}) on {}: {e}",
                            m.type_,
                            m.source,
                            target.display()
                        ),
                    )
                })?;
            Ok((target, true))
        }
        _ => Err(err(
            Code::INVALID_ARGUMENT,
            format!(
                "{} rootfs mounts: containerd-shim-brig-v2 takes one (the snapshotter's)",
                mounts.len()
            ),
        )),
    }
}

impl Service {
    async fn create_task(
        &self,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let inner = &self.inner;
        let id = req.id.clone();
        brig_runtime::state::validate_id("container", &id)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "restoring a checkpoint is not supported by microVM sandboxes",
            ));
        }
        let paths = StdioPaths::checked(&req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(bundle.join("config.json")).map_err(|e| {
            err(
                Code::INVALID_ARGUMENT,
                format!("reading {}/config.json: {e}", bundle.display()),
            )
        })?;
        let mut pod = inner.pod.lock().await;
        if pod.containers.contains_key(&id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {id} exists in this pod"),
            ));
        }
        if pod.config.is_none() {
            let path = crate::options::config_path(req.options.as_ref())
                .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
            let mut config = RuntimeConfig::load_from(path.as_deref())
                .map_err(|e| err(Code::FAILED_PRECONDITION, e.to_string()))?;
            config.root = namespace_root(&config.root, &inner.namespace)
                .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
            pod.config = Some(config);
        }
        let config = pod.config.clone().expect("set above");
        crate::bootstrap::record_root(&bundle, &config.root).map_err(|e| {
            err(
                Code::INTERNAL,
                format!("writing the state root into {}: {e}", bundle.display()),
            )
        })?;
        let (rootfs, mounted) = mount_rootfs(&req.rootfs, &bundle, &spec).await?;
        // The sandbox container (whose ID is the pod's) holds the namespaces the others join.
        let join = pod
            .containers
            .get(&inner.group)
            .and_then(|c| c.container.state().guest_pid)
            .map(|guest| (vmm_pid(&pod), guest));
        let netns = network_namespace(&spec);
        let (spec, volumes) = guest_spec(spec, join);
        let result = self
            .create_in_pod(
                &mut pod, &config, &id, spec, rootfs, volumes, &paths, netns, &bundle,
            )
            .await;
        let (container, relay) = match result {
            Ok(ok) => ok,
            Err(e) => {
                if mounted {
                    unmount_rootfs(&bundle.join("rootfs"));
                }
                // A pod whose first container failed has nothing left to run.
                if pod.containers.is_empty() {
                    if let Some(sandbox) = pod.sandbox.take().and_then(|s| Arc::try_unwrap(s).ok())
                    {
                        let _ = sandbox.stop().await;
                    }
                    if let Some(cgroup) = pod.cgroup.take() {
                        cgroup.leave();
                    }
                }
                return Err(e);
            }
        };
        let mut init = Proc::new(paths, None);
        init.close_stdin = Some(relay.stdin_closer());
        init.relay = Some(relay);
        pod.containers.insert(
            id.clone(),
            Ctr {
                container,
                bundle: bundle.clone(),
                rootfs_mounted: mounted,
                init,
                execs: HashMap::new(),
                oom_published: false,
            },
        );
        let pid = vmm_pid(&pod);
        drop(pod);
        inner
            .publish(TaskCreate {
                container_id: id,
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: MessageField::some(containerd_shim_protos::events::task::TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            })
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_in_pod(
        &self,
        pod: &mut Pod,
        config: &RuntimeConfig,
        id: &str,
        spec: Spec,
        rootfs: PathBuf,
        volumes: Vec<Volume>,
        paths: &StdioPaths,
        netns: Option<PathBuf>,
        bundle: &Path,
    ) -> TtrpcResult<(Container, Relay)> {
        let inner = &self.inner;
        if pod.sandbox.is_none() {
            let mut sandbox_spec = SandboxSpec::new(inner.group.clone(), config);
            sandbox_spec.share = true;
            // The pod's network namespace (CNI's): the VMM, the PID containerd sees for
            // the pod, lives in it, and the guest gets its interface.
            sandbox_spec.netns = netns;
            sandbox_spec.fit(&spec);
            fit_pod(&mut sandbox_spec, &spec);
            // Into the pod's cgroup before the VMM starts, which then inherits it.
            let cgroups_path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
            if let Some(path) = cgroups_path.as_deref().and_then(Path::to_str) {
                pod.cgroup = Some(brig_runtime::cgroup::PodCgroup::enter(path).map_err(|e| {
                    err(Code::FAILED_PRECONDITION, format!("the pod's cgroup: {e}"))
                })?);
            }
            let started = Sandbox::start(config, &sandbox_spec).await;
            let sandbox = started.map_err(|e| {
                if let Some(cgroup) = pod.cgroup.take() {
                    cgroup.leave();
                }
                err(
                    Code::UNAVAILABLE,
                    format!("starting the pod's microVM: {e}"),
                )
            })?;
            self.inner.watch_oom(&sandbox);
            pod.sandbox = Some(Arc::new(sandbox));
        }
        let sandbox = sandbox_of(pod)?;
        let layout = Layout::new(&config.root);
        let mut container = Container::claim(&layout, id, &inner.group, spec.process().clone())
            .map_err(runtime_err)?;
        if let Err(e) = container.set_owner(ProcessRef::current()) {
            let _ = container.forget();
            return Err(runtime_err(e));
        }
        let created = container
            .create(
                &sandbox,
                &ContainerConfig {
                    id: id.to_string(),
                    spec,
                    rootfs,
                    volumes,
                    stdin: !paths.stdin.is_empty(),
                    bundle: Some(bundle.to_path_buf()),
                },
            )
            .await;
        let stdio = match created {
            Ok(stdio) => stdio,
            Err(e) => {
                let reply = runtime_err(e);
                let _ = container.forget();
                return Err(reply);
            }
        };
        let who = crate::io::LogFor {
            container: id,
            namespace: &inner.namespace,
        };
        match Relay::start(paths, stdio, who).await {
            Ok(relay) => Ok((container, relay)),
            Err(e) => {
                let _ = sandbox.agent().remove_container(id).await;
                let _ = container.forget();
                Err(err(
                    Code::INTERNAL,
                    format!("opening the stdio of {id}: {e}"),
                ))
            }
        }
    }
}

#[async_trait]
impl Task for Service {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::debug!(id = %req.id, bundle = %req.bundle, "create");
        self.create_task(req).await
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        tracing::debug!(id = %req.id, exec = %req.exec_id, "start");
        let inner = &self.inner;
        let mut pod = inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        let pid = vmm_pid(&pod);
        let ctr = pod.ctr_mut(&req.id)?;
        if req.exec_id.is_empty() {
            ctr.container.start(&sandbox).await.map_err(runtime_err)?;
            ctr.init.started = true;
            let relay = ctr.init.relay.take().ok_or_else(|| {
                err(
                    Code::FAILED_PRECONDITION,
                    format!("container {} was started already", req.id),
                )
            })?;
            inner.watch(&sandbox, &req.id, "", relay);
            drop(pod);
            inner
                .publish(TaskStart {
                    container_id: req.id,
                    pid,
                    ..Default::default()
                })
                .await;
        } else {
            let proc = ctr.execs.get_mut(&req.exec_id).ok_or_else(|| {
                not_found(&format!("exec {:?} of container {}", req.exec_id, req.id))
            })?;
            let process = proc.spec.take().ok_or_else(|| {
                err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} was started already", req.exec_id),
                )
            })?;
            let json = serde_json::to_string(&process)
                .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
            let stdio = exec_process(
                sandbox.agent(),
                &sandbox.vsock_uds(),
                &req.id,
                &req.exec_id,
                json,
                !proc.paths.stdin.is_empty(),
                proc.paths.terminal,
            )
            .await;
            let stdio = match stdio {
                Ok(stdio) => stdio,
                Err(e) => {
                    let code = e.command_status().map(u32::from).unwrap_or(LOST_STATUS);
                    proc.exit.send_replace(Some(Exited { code, at: now() }));
                    return Err(runtime_err(e));
                }
            };
            let who = crate::io::LogFor {
                container: &req.id,
                namespace: &inner.namespace,
            };
            let relay = Relay::start(&proc.paths, stdio, who).await.map_err(|e| {
                err(
                    Code::INTERNAL,
                    format!("opening the stdio of exec {}: {e}", req.exec_id),
                )
            })?;
            proc.close_stdin = Some(relay.stdin_closer());
            proc.started = true;
            inner.watch(&sandbox, &req.id, &req.exec_id, relay);
            drop(pod);
            inner
                .publish(TaskExecStarted {
                    container_id: req.id,
                    exec_id: req.exec_id,
                    pid,
                    ..Default::default()
                })
                .await;
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let pod = self.inner.pod.lock().await;
        let pid = vmm_pid(&pod);
        let ctr = pod.ctr(&req.id)?;
        let proc = ctr.proc(&req.exec_id)?;
        let status = if req.exec_id.is_empty() {
            match ctr.container.state().status {
                Status::Creating | Status::Created => api::Status::CREATED,
                Status::Running => api::Status::RUNNING,
                Status::Paused => api::Status::PAUSED,
                Status::Stopped => api::Status::STOPPED,
            }
        } else {
            proc.status()
        };
        let exited = proc.exited();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: ctr.bundle.display().to_string(),
            pid,
            status: status.into(),
            stdin: proc.paths.stdin.clone(),
            stdout: proc.paths.stdout.clone(),
            stderr: proc.paths.stderr.clone(),
            terminal: proc.paths.terminal,
            exit_status: exited.as_ref().map(|e| e.code).unwrap_or(0),
            exited_at: exited.map(|e| e.at).into(),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        tracing::debug!(id = %req.id, exec = %req.exec_id, signal = req.signal, all = req.all, "kill");
        let pod = self.inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        let ctr = pod.ctr(&req.id)?;
        let proc = ctr.proc(&req.exec_id)?;
        if proc.exited().is_some()
            || (req.exec_id.is_empty() && ctr.container.state().status == Status::Stopped)
        {
            return Err(not_found("process already finished: process"));
        }
        let signal = i32::try_from(req.signal).map_err(|_| {
            err(
                Code::INVALID_ARGUMENT,
                format!("invalid signal {}", req.signal),
            )
        })?;
        if req.exec_id.is_empty() {
            ctr.container
                .signal(&sandbox, signal, req.all)
                .await
                .map_err(runtime_err)?;
        } else {
            if !proc.started {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is not started", req.exec_id),
                ));
            }
            sandbox
                .agent()
                .signal_process(&req.id, &req.exec_id, req.signal, false)
                .await
                .map_err(|e| runtime_err(e.into()))?;
        }
        Ok(api::Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        tracing::debug!(id = %req.id, exec = %req.exec_id, "delete");
        let inner = &self.inner;
        let mut pod = inner.pod.lock().await;
        let pid = vmm_pid(&pod);
        let sandbox = sandbox_of(&pod)?;
        let ctr = pod.ctr_mut(&req.id)?;
        if !req.exec_id.is_empty() {
            let proc = ctr.proc(&req.exec_id)?;
            if proc.started && proc.exited().is_none() {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("exec {} is running: kill it first", req.exec_id),
                ));
            }
            let exited = proc.exited();
            ctr.execs.remove(&req.exec_id);
            return Ok(api::DeleteResponse {
                pid,
                exit_status: exited.as_ref().map(|e| e.code).unwrap_or(0),
                exited_at: exited.map(|e| e.at).into(),
                ..Default::default()
            });
        }
        if ctr.container.state().status == Status::Running && ctr.init.exited().is_none() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is running: kill it first", req.id),
            ));
        }
        let ctr = pod.containers.remove(&req.id).expect("looked up above");
        let exited = ctr.init.exited();
        let removed = ctr.container.remove(&sandbox).await;
        if ctr.rootfs_mounted {
            unmount_rootfs(&ctr.bundle.join("rootfs"));
        }
        if let Err(e) = removed {
            tracing::warn!("removing {} from the microVM: {e}", req.id);
        }
        let exit_status = exited.as_ref().map(|e| e.code).unwrap_or(LOST_STATUS);
        let exited_at = exited.map(|e| e.at).unwrap_or_else(now);
        drop(pod);
        inner
            .publish(TaskDelete {
                container_id: req.id.clone(),
                id: req.id,
                pid,
                exit_status,
                exited_at: MessageField::some(exited_at.clone()),
                ..Default::default()
            })
            .await;
        Ok(api::DeleteResponse {
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        tracing::debug!(id = %req.id, exec = %req.exec_id, "exec");
        brig_runtime::state::validate_id("exec", &req.exec_id)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        let paths = StdioPaths::checked(&req.stdin, &req.stdout, &req.stderr, req.terminal)
            .map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let process: Process = request_json(req.spec.as_ref(), "the exec's process spec")?;
        let mut pod = self.inner.pod.lock().await;
        let ctr = pod.ctr_mut(&req.id)?;
        if ctr.container.state().status != Status::Running || ctr.init.exited().is_some() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        if ctr.execs.contains_key(&req.exec_id) {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec {} exists in container {}", req.exec_id, req.id),
            ));
        }
        ctr.execs
            .insert(req.exec_id.clone(), Proc::new(paths, Some(process)));
        drop(pod);
        self.inner
            .publish(TaskExecAdded {
                container_id: req.id,
                exec_id: req.exec_id,
                ..Default::default()
            })
            .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let pod = self.inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        let ctr = pod.ctr(&req.id)?;
        let proc = ctr.proc(&req.exec_id)?;
        if !proc.paths.terminal {
            return Err(err(
                Code::FAILED_PRECONDITION,
                "the process has no terminal",
            ));
        }
        sandbox
            .agent()
            .resize_tty(&req.id, &req.exec_id, req.height, req.width)
            .await
            .map_err(|e| runtime_err(e.into()))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let pod = self.inner.pod.lock().await;
        let ctr = pod.ctr(&req.id)?;
        let proc = ctr.proc(&req.exec_id)?;
        if req.stdin {
            if let Some(close) = &proc.close_stdin {
                close.notify_one();
            }
        }
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut exit = {
            let pod = self.inner.pod.lock().await;
            let ctr = pod.ctr(&req.id)?;
            ctr.proc(&req.exec_id)?.exit.subscribe()
        };
        let exited = exit
            .wait_for(Option::is_some)
            .await
            .map_err(|_| err(Code::NOT_FOUND, "the process was deleted while waiting"))?
            .clone()
            .expect("waited for Some");
        Ok(api::WaitResponse {
            exit_status: exited.code,
            exited_at: MessageField::some(exited.at),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let pod = self.inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        pod.ctr(&req.id)?;
        let processes = sandbox
            .agent()
            .list_processes(&req.id)
            .await
            .map_err(|e| runtime_err(e.into()))?;
        Ok(api::PidsResponse {
            processes: processes
                .into_iter()
                .map(|p| containerd_shim_protos::types::task::ProcessInfo {
                    pid: p.pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let pod = self.inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        let ctr = pod.ctr(&req.id)?;
        let stats = ctr.container.stats(&sandbox).await.map_err(runtime_err)?;
        let metrics = crate::metrics::v2(&stats);
        let value = metrics
            .write_to_bytes()
            .map_err(|e| err(Code::INTERNAL, e.to_string()))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: crate::metrics::V2_TYPE_URL.into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let mut pod = self.inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        let ctr = pod.ctr_mut(&req.id)?;
        ctr.container.pause(&sandbox).await.map_err(runtime_err)?;
        drop(pod);
        self.inner
            .publish(TaskPaused {
                container_id: req.id,
                ..Default::default()
            })
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut pod = self.inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        let ctr = pod.ctr_mut(&req.id)?;
        ctr.container.resume(&sandbox).await.map_err(runtime_err)?;
        drop(pod);
        self.inner
            .publish(TaskResumed {
                container_id: req.id,
                ..Default::default()
            })
            .await;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        // containerd sends the OCI LinuxResources as JSON in an Any.
        let linux: LinuxResources = request_json(
            req.resources.as_ref(),
            "the update's resources (OCI LinuxResources JSON)",
        )?;
        let resources = Resources::from(&linux);
        let pod = self.inner.pod.lock().await;
        let sandbox = sandbox_of(&pod)?;
        let ctr = pod.ctr(&req.id)?;
        ctr.container
            .update(&sandbox, &resources)
            .await
            .map_err(runtime_err)?;
        Ok(api::Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(err(
            Code::UNIMPLEMENTED,
            "checkpoints are not supported by microVM sandboxes",
        ))
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let pod = self.inner.pod.lock().await;
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: vmm_pid(&pod),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut pod = self.inner.pod.lock().await;
        // containerd asks after every Delete: the shim ends only when its pod is empty.
        if !pod.containers.is_empty() {
            return Ok(api::Empty::new());
        }
        if let Some(sandbox) = pod.sandbox.take() {
            match Arc::try_unwrap(sandbox) {
                Ok(sandbox) => {
                    if let Err(e) = sandbox.stop().await {
                        tracing::warn!("stopping the pod's microVM: {e}");
                    }
                }
                // A watcher still holds it: dropping the last reference kills the VMM.
                Err(shared) => drop(shared),
            }
        }
        if let Some(cgroup) = pod.cgroup.take() {
            cgroup.leave();
        }
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_sandbox_task_names_the_pod_network_namespace_cni_made() {
        let with = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"namespaces":[
              {"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1234"}]}}"#,
        );
        assert_eq!(
            network_namespace(&with),
            Some(PathBuf::from("/var/run/netns/cni-1234"))
        );
        // A new namespace (ctr run without CNI), or none at all: the guest's loopback only.
        let new = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{"namespaces":[
              {"type":"network"}]}}"#,
        );
        assert_eq!(network_namespace(&new), None);
        let host = spec(r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"linux":{}}"#);
        assert_eq!(network_namespace(&host), None);
    }

    #[test]
    fn json_from_containerd_is_bounded_before_it_is_parsed() {
        let code = |e: ttrpc::Error| match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("not a status: {other:?}"),
        };
        let any = |value: Vec<u8>| Any {
            value,
            ..Default::default()
        };
        let ok: LinuxResources =
            request_json(Some(&any(br#"{"pids":{"limit":5}}"#.to_vec())), "r").unwrap();
        assert_eq!(ok.pids().as_ref().map(|p| p.limit()), Some(5));
        // One byte past the bound: refused without being parsed (it is valid JSON).
        let mut big = b"{\"x\":\"".to_vec();
        big.resize(MAX_REQUEST_JSON - 1, b'a');
        big.extend_from_slice(b"\"}");
        assert_eq!(big.len(), MAX_REQUEST_JSON + 1);
        let (c, msg) =
            code(request_json::<serde_json::Value>(Some(&any(big)), "the spec").unwrap_err());
        assert_eq!(c, Code::INVALID_ARGUMENT);
        assert_eq!(
            msg,
            format!("the spec is larger than {MAX_REQUEST_JSON} bytes")
        );
        let (c, msg) =
            code(request_json::<Process>(Some(&any(b"{".to_vec())), "the spec").unwrap_err());
        assert_eq!(c, Code::INVALID_ARGUMENT);
        assert!(msg.starts_with("the spec: "), "{msg}");
        // Absent is empty, which is not a document.
        assert!(request_json::<Process>(None, "the spec").is_err());
    }

    #[test]
    fn host_namespaces_are_dropped_and_host_binds_become_volumes() {
        let dir = std::env::temp_dir().join(format!("brig-shim-guest-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let (spec, volumes) = guest_spec(
            spec(&format!(
                r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},
            "mounts":[
              {{"destination":"/proc","type":"proc","source":"proc"}},
              {{"destination":"/etc/hosts","type":"bind","source":"{}","options":["rbind","rprivate","ro"]}},
              {{"destination":"/data","type":"bind","source":"{}","options":["rbind"]}},
              {{"destination":"/gone","type":"bind","source":"/no/such/host/path","options":["rbind"]}}
            ],
            "linux":{{"namespaces":[
              {{"type":"pid"}},
              {{"type":"network","path":"/var/run/netns/cni-1"}},
              {{"type":"ipc","path":"/proc/4242/ns/ipc"}},
              {{"type":"mount"}}
            ]}}}}"#,
                hosts.display(),
                dir.display()
            )),
            None,
        );
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        let kinds: Vec<_> = namespaces
            .iter()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (LinuxNamespaceType::Pid, None),
                (LinuxNamespaceType::Ipc, None),
                (LinuxNamespaceType::Mount, None)
            ]
        );
        assert_eq!(
            volumes,
            vec![
                Volume {
                    host: hosts.clone(),
                    container: "/etc/hosts".into(),
                    read_only: true
                },
                Volume {
                    host: dir.clone(),
                    container: "/data".into(),
                    read_only: false
                },
            ]
        );
        let left: Vec<_> = spec
            .mounts()
            .clone()
            .unwrap()
            .iter()
            .map(|m| m.destination().clone())
            .collect();
        assert_eq!(left, vec![PathBuf::from("/proc"), PathBuf::from("/gone")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_sandbox_namespaces_a_pod_shares_become_the_guest_ones() {
        let (spec, _) = guest_spec(
            spec(
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "linux":{"namespaces":[
                  {"type":"ipc","path":"/proc/4242/ns/ipc"},
                  {"type":"uts","path":"/proc/4242/ns/uts"},
                  {"type":"pid","path":"/proc/4242/ns/pid"},
                  {"type":"mount","path":"/proc/4242/ns/mnt"},
                  {"type":"cgroup","path":"/proc/4242/ns/../../1/ns/ipc"},
                  {"type":"user","path":"/proc/999/ns/user"}
                ]}}"#,
            ),
            Some((4242, 17)),
        );
        let paths: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap()
            .into_iter()
            .map(|n| n.path().clone())
            .collect();
        assert_eq!(
            paths,
            vec![
                Some(PathBuf::from("/proc/17/ns/ipc")),
                Some(PathBuf::from("/proc/17/ns/uts")),
                Some(PathBuf::from("/proc/17/ns/pid")),
                None,
                None,
                None
            ]
        );
    }

    #[test]
    fn a_pod_s_limits_in_cri_annotations_size_the_vm() {
        let pod_vm = || SandboxSpec {
            id: "pod".into(),
            cpus: 1,
            memory_mib: 256,
            cmdline: None,
            share: true,
            tie_to_owner: false,
            outlives_owner: false,
            netns: None,
            bridge: None,
        };
        let mut sandbox = pod_vm();
        fit_pod(
            &mut sandbox,
            &spec(
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"annotations":{
                "io.kubernetes.cri.sandbox-memory":"1073741824",
                "io.kubernetes.cri.sandbox-cpu-quota":"250000",
                "io.kubernetes.cri.sandbox-cpu-period":"100000"}}"#,
            ),
        );
        assert_eq!(sandbox.cpus, 3);
        assert!(sandbox.memory_mib >= 1024, "{}", sandbox.memory_mib);
        let mut small = pod_vm();
        fit_pod(
            &mut small,
            &spec(
                r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},"annotations":{
                "io.kubernetes.cri.sandbox-memory":"garbage",
                "io.kubernetes.cri.sandbox-cpu-quota":"-1"}}"#,
            ),
        );
        assert_eq!((small.cpus, small.memory_mib), (1, 256));
    }
}

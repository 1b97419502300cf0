//! Containers inside the guest: the lifecycle verbs behind the container RPCs.
//!
//! Each container's init is the agent binary re-executed (`__container-init`, see
//! [`init`]) in new namespaces; it sets up the container, reports on a status pipe, waits for
//! StartContainer and executes the command, which is PID 1 of the container. When the spec
//! asks for a user namespace, the init is created in a new one whose ID maps the agent
//! writes (see [`userns`]).

mod cgroup;
mod credentials;
mod devices;
mod hooks;
pub mod init;
mod mounts;
mod process;
mod seccomp;
mod spec;
mod stdio;
mod userns;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use brig_protocols::agent::{ProcessInfo, StdioPorts};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use thiserror::Error;

use cgroup::Cgroup;
pub use cgroup::{is_cgroup2, CgroupStats, ResourceUpdate};
pub use process::ExitInfo;
use process::{Process, SpawnOptions, Starter};
pub use spec::{parse_process, parse_spec};
use spec::{InitConfig, InitMode};

use crate::reaper::Reaper;
use crate::vsock_self_test::Target;

/// Where the sandbox's virtio-fs share is mounted.
pub const SHARED_DIR: &str = "/run/brig/shared";
/// How long RemoveContainer waits for the init to die after SIGKILL.
const REMOVE_WAIT: Duration = Duration::from_secs(10);
/// How often WaitOomEvent looks at the containers' memory.events.
const OOM_POLL: Duration = Duration::from_millis(100);

/// Why a container call failed; each maps to a ttrpc code.
#[derive(Debug, Error)]
pub enum ContainerError {
    /// NOT_FOUND: no such container/process, or the command does not exist.
    #[error("{0}")]
    NotFound(String),
    /// PERMISSION_DENIED: the command cannot be executed.
    #[error("{0}")]
    PermissionDenied(String),
    /// INVALID_ARGUMENT: a bad spec or request.
    #[error("{0}")]
    InvalidArgument(String),
    /// ALREADY_EXISTS: the id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// FAILED_PRECONDITION: the call does not fit the container's state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// DEADLINE_EXCEEDED: the kernel did not do it in time (a freeze that never completed).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// UNAVAILABLE: the host side is not there (stdio listener missing).
    #[error("{0}")]
    Unavailable(String),
    /// INTERNAL: anything else.
    #[error("{0}")]
    Internal(String),
}

/// How the agent runs containers (differs between the guest and a debugging run).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where stdio connections go.
    pub stdio_target: Target,
    /// The parent of container cgroups; None = no cgroups (debug runs on cgroup v1 hosts).
    pub cgroup_root: Option<PathBuf>,
    /// The state of the sandbox share: None = fine or not needed; Some(problem) = rootfs
    /// under it cannot work.
    pub share_problem: Option<String>,
}

struct Container {
    id: String,
    spec: Spec,
    cgroup: Option<Cgroup>,
    init: Arc<Process>,
    starter: Mutex<Option<Starter>>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

/// All containers of the sandbox.
pub struct Containers {
    config: RuntimeConfig,
    reaper: Arc<Reaper>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    /// Per container, the oom_kill count WaitOomEvent last reported.
    oom_reported: Mutex<HashMap<String, u64>>,
}

impl Containers {
    /// No containers yet.
    pub fn new(config: RuntimeConfig, reaper: Arc<Reaper>) -> Self {
        Self {
            config,
            reaper,
            containers: Mutex::new(HashMap::new()),
            oom_reported: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("no container {id:?}")))
    }

    /// CreateContainer: sets up the container; its init waits for [`Containers::start`].
    pub fn create(
        &self,
        id: &str,
        spec_json: &str,
        rootfs: &str,
        ports: &StdioPorts,
    ) -> Result<Pid, ContainerError> {
        spec::validate_id("container", id)?;
        if self.get(id).is_ok() {
            return Err(ContainerError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        let mut spec = spec::parse_spec(spec_json)?;
        let rootfs = self.resolve_rootfs(&spec, rootfs)?;
        resolve_bind_sources(&mut spec)?;
        if let Some(root) = spec.root_mut() {
            root.set_path(rootfs.clone());
        } else {
            spec.set_root(Some(
                oci_spec::runtime::RootBuilder::default()
                    .path(rootfs.clone())
                    .build()
                    .map_err(|err| ContainerError::Internal(err.to_string()))?,
            ));
        }

        let (clone_flags, join_pid_ns) = namespaces(&spec)?;
        let id_mappings = userns::from_spec(&spec)?;
        mounts::create_bind_targets(&spec, &rootfs).map_err(ContainerError::Internal)?;
        let cgroup = match &self.config.cgroup_root {
            Some(root) => {
                let cgroup = Cgroup::create(root, id)?;
                if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref())
                {
                    if let Err(err) = cgroup.apply(resources) {
                        let _ = cgroup.kill_and_remove();
                        return Err(err);
                    }
                }
                Some(cgroup)
            }
            None => None,
        };
        let cleanup = |err: ContainerError| {
            if let Some(cgroup) = &cgroup {
                let _ = cgroup.kill_and_remove();
            }
            err
        };
        let terminal = spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false);
        let (child_stdio, handles) =
            stdio::setup(&self.config.stdio_target, ports, terminal, id).map_err(cleanup)?;
        let config = InitConfig {
            mode: InitMode::Init,
            hooks: hooks::HookContext::of(id, &spec),
            spec: spec.clone(),
        };
        let spawned = process::spawn(
            &self.reaper,
            SpawnOptions {
                clone_flags,
                join_pid_ns,
                id_mappings,
            },
            child_stdio.fds,
            child_stdio.console_socket,
            &config,
            |pid| match &cgroup {
                Some(cgroup) => cgroup.add(pid.as_raw()),
                None => Ok(()),
            },
        );
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(err) => {
                handles.close_stdin();
                return Err(cleanup(err));
            }
        };
        let (pid, statuses, starter) = spawned.into_parts();
        let mut handles = handles;
        if let Err(err) = handles.receive_terminal() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            handles.close_stdin();
            return Err(cleanup(err));
        }
        let oom_path = cgroup.as_ref().map(|c| c.path().to_path_buf());
        let init = Process::follow(pid, statuses, handles, move || {
            oom_kills(oom_path.as_deref())
        });
        let container = Arc::new(Container {
            id: id.to_string(),
            spec,
            cgroup,
            init,
            starter: Mutex::new(Some(starter)),
            execs: Mutex::new(HashMap::new()),
        });
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_string(), container);
        crate::info!("created container {id} (init pid {pid})");
        Ok(pid)
    }

    fn resolve_rootfs(&self, spec: &Spec, rootfs: &str) -> Result<PathBuf, ContainerError> {
        let given = if rootfs.is_empty() {
            spec.root()
                .as_ref()
                .map(|r| r.path().clone())
                .ok_or_else(|| {
                    ContainerError::InvalidArgument(
                        "no rootfs: give CreateContainerRequest.rootfs or root.path".into(),
                    )
                })?
        } else {
            PathBuf::from(rootfs)
        };
        let path = if given.is_absolute() {
            given
        } else {
            spec::join_under(Path::new(SHARED_DIR), &given)?
        };
        if path.starts_with(SHARED_DIR) {
            if let Some(problem) = &self.config.share_problem {
                return Err(ContainerError::FailedPrecondition(format!(
                    "the rootfs {} is on the sandbox share, which is not available: {problem}",
                    path.display()
                )));
            }
        }
        if !path.is_dir() {
            return Err(ContainerError::InvalidArgument(format!(
                "the rootfs {} is not a directory in the guest",
                path.display()
            )));
        }
        Ok(path)
    }

    /// StartContainer: lets the init execute its command.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let starter = container
            .starter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| {
                ContainerError::FailedPrecondition(format!("container {id:?} was already started"))
            })?;
        starter.start()?;
        crate::info!("started container {id}");
        Ok(())
    }

    /// ExecProcess: runs another process in a running container.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &str,
        ports: &StdioPorts,
    ) -> Result<Pid, ContainerError> {
        let container = self.get(id)?;
        spec::validate_id("exec", exec_id)?;
        let process = spec::parse_process(process_json)?;
        if let Some(mappings) = userns::from_spec(&container.spec)? {
            // It joins the container's user namespace (see `init::join_container`).
            mappings.check_user(process.user())?;
        }
        if container.init.exit().is_some() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        if container
            .starter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
        {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} has not been started"
            )));
        }
        if container
            .execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(exec_id)
        {
            return Err(ContainerError::AlreadyExists(format!(
                "exec {exec_id:?} already exists in container {id:?}"
            )));
        }
        let terminal = process.terminal().unwrap_or(false);
        let mut spec = container.spec.clone();
        spec.set_process(Some(process));
        let init_pid = container.init.pid;
        let (child_stdio, handles) = stdio::setup(
            &self.config.stdio_target,
            ports,
            terminal,
            &format!("{id}-{exec_id}"),
        )?;
        let config = InitConfig {
            mode: InitMode::Exec {
                init_pid: init_pid.as_raw(),
            },
            spec,
            hooks: None,
        };
        let spawned = process::spawn(
            &self.reaper,
            SpawnOptions {
                clone_flags: CloneFlags::empty(),
                join_pid_ns: Some(PathBuf::from(format!("/proc/{init_pid}/ns/pid"))),
                id_mappings: None,
            },
            child_stdio.fds,
            child_stdio.console_socket,
            &config,
            |pid| match &container.cgroup {
                Some(cgroup) => cgroup.add(pid.as_raw()),
                None => Ok(()),
            },
        );
        let spawned = match spawned {
            Ok(spawned) => spawned,
            Err(err) => {
                handles.close_stdin();
                return Err(err);
            }
        };
        let (pid, statuses, starter) = spawned.into_parts();
        let mut handles = handles;
        if let Err(err) = handles.receive_terminal() {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            handles.close_stdin();
            return Err(err);
        }
        let oom_path = container.cgroup.as_ref().map(|c| c.path().to_path_buf());
        let exec = Process::follow(pid, statuses, handles, move || {
            oom_kills(oom_path.as_deref())
        });
        container
            .execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(exec_id.to_string(), exec);
        if let Err(err) = starter.start() {
            container
                .execs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(exec_id);
            return Err(err);
        }
        crate::info!("exec {exec_id} in container {id}: pid {pid}");
        Ok(pid)
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        let container = self.get(id)?;
        if exec_id.is_empty() {
            return Ok(Arc::clone(&container.init));
        }
        let execs = container
            .execs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        execs.get(exec_id).cloned().ok_or_else(|| {
            ContainerError::NotFound(format!("no exec {exec_id:?} in container {id:?}"))
        })
    }

    /// SignalProcess.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| ContainerError::InvalidArgument(format!("unknown signal {signal}")))?;
        let process = self.process(id, exec_id)?;
        if all {
            let container = self.get(id)?;
            let pids = match &container.cgroup {
                Some(cgroup) => cgroup.pids().unwrap_or_default(),
                None => Vec::new(),
            };
            for pid in pids.into_iter().filter(|p| *p != process.pid.as_raw()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
        }
        if process.exit().is_some() {
            return Err(ContainerError::NotFound(format!(
                "process {} has already exited",
                process.pid
            )));
        }
        nix::sys::signal::kill(process.pid, signal).map_err(|err| {
            ContainerError::Internal(format!("cannot signal process {}: {err}", process.pid))
        })
    }

    /// WaitProcess: blocks until the process exited and its output was flushed.
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo, ContainerError> {
        Ok(self.process(id, exec_id)?.wait())
    }

    /// CloseStdin.
    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        self.process(id, exec_id)?.stdio.close_stdin();
        Ok(())
    }

    /// ResizeTty.
    pub fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ContainerError> {
        let size = |v: u32| {
            u16::try_from(v).map_err(|_| {
                ContainerError::InvalidArgument(format!("terminal size {v} is over 65535"))
            })
        };
        self.process(id, exec_id)?
            .stdio
            .resize(size(rows)?, size(cols)?)
    }

    /// ListProcesses: every process of the container's cgroup.
    pub fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, ContainerError> {
        let container = self.get(id)?;
        let pids = match &container.cgroup {
            Some(cgroup) => cgroup.pids().map_err(|err| {
                ContainerError::Internal(format!("cannot list the cgroup's processes: {err}"))
            })?,
            None => {
                let mut pids = vec![container.init.pid.as_raw()];
                pids.extend(
                    container
                        .execs
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .values()
                        .filter(|p| p.exit().is_none())
                        .map(|p| p.pid.as_raw()),
                );
                pids
            }
        };
        Ok(pids
            .into_iter()
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline)
                    .trim_end_matches('\0')
                    .replace('\0', " ");
                ProcessInfo {
                    pid: u32::try_from(pid).unwrap_or(0),
                    cmdline,
                    ..Default::default()
                }
            })
            .collect())
    }

    /// Stats.
    pub fn stats(&self, id: &str) -> Result<CgroupStats, ContainerError> {
        let container = self.get(id)?;
        let cgroup = container.cgroup.as_ref().ok_or_else(|| {
            ContainerError::FailedPrecondition(
                "this agent runs without cgroups (debug run on a cgroup v1 host)".into(),
            )
        })?;
        Ok(cgroup.stats())
    }

    fn cgroup_of<'a>(container: &'a Container, call: &str) -> Result<&'a Cgroup, ContainerError> {
        container.cgroup.as_ref().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!(
                "{call} needs cgroups, and this agent runs without them (debug run on a cgroup v1 host)"
            ))
        })
    }

    /// PauseContainer: freezes the container's cgroup and waits until it is frozen.
    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let cgroup = Self::cgroup_of(&container, "pause")?;
        if container.init.exit().is_some() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {id:?} is not running"
            )));
        }
        cgroup.freeze()?;
        crate::info!("paused container {id}");
        Ok(())
    }

    /// ResumeContainer: thaws the container's cgroup.
    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        Self::cgroup_of(&container, "resume")?.thaw()?;
        crate::info!("resumed container {id}");
        Ok(())
    }

    /// UpdateContainer: new cgroup limits.
    pub fn update(&self, id: &str, update: &ResourceUpdate) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        Self::cgroup_of(&container, "update")?.update(update)?;
        crate::info!("updated container {id}: {update:?}");
        Ok(())
    }

    /// WaitOomEvent: blocks until a container's oom_kill count is above the one last
    /// reported for it; returns the container and its count.
    pub fn wait_oom(&self) -> (String, u64) {
        loop {
            if let Some(event) = self.next_oom() {
                return event;
            }
            std::thread::sleep(OOM_POLL);
        }
    }

    fn next_oom(&self) -> Option<(String, u64)> {
        let containers: Vec<Arc<Container>> = self
            .containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut reported = self
            .oom_reported
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for container in containers {
            let Some(cgroup) = &container.cgroup else {
                continue;
            };
            let count = cgroup.oom_kills();
            let last = reported.entry(container.id.clone()).or_insert(0);
            if count > *last {
                *last = count;
                return Some((container.id.clone(), count));
            }
        }
        None
    }

    /// RemoveContainer: kills what still runs and forgets the container.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let container = self.get(id)?;
        let result = match &container.cgroup {
            Some(cgroup) => cgroup.kill_and_remove(),
            None => {
                let _ = nix::sys::signal::kill(container.init.pid, Signal::SIGKILL);
                Ok(())
            }
        };
        // Releases an init that was never started.
        drop(
            container
                .starter
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        if container.init.wait_timeout(REMOVE_WAIT).is_none() {
            crate::warn!(
                "container {}: init did not exit after SIGKILL",
                container.id
            );
        }
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        self.oom_reported
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        crate::info!("removed container {id}");
        result
    }
}

fn oom_kills(cgroup: Option<&Path>) -> u64 {
    let Some(path) = cgroup else { return 0 };
    std::fs::read_to_string(path.join("memory.events"))
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                line.strip_prefix("oom_kill ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Clone flags for the init, and a pid namespace to join instead of creating one.
fn namespaces(spec: &Spec) -> Result<(CloneFlags, Option<PathBuf>), ContainerError> {
    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    let mut join_pid = None;
    for ns in spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
    {
        match (ns.typ(), ns.path()) {
            (LinuxNamespaceType::Network, None) => flags |= CloneFlags::CLONE_NEWNET,
            // Created with the others, so that they belong to it; its maps are written by
            // the agent (see `process::spawn`). A path was refused by `userns::from_spec`.
            (LinuxNamespaceType::User, None) => flags |= CloneFlags::CLONE_NEWUSER,
            (LinuxNamespaceType::Pid, Some(path)) if path.exists() => {
                flags.remove(CloneFlags::CLONE_NEWPID);
                join_pid = Some(path.clone());
            }
            // Other paths are joined by the init; paths that only mean something on the
            // host (a host netns) do not exist here and are ignored: the guest's is used.
            (_, Some(path)) if !path.exists() => {
                crate::info!(
                    "namespace {:?} path {} does not exist in the guest; ignoring it",
                    ns.typ(),
                    path.display()
                );
            }
            _ => {}
        }
    }
    Ok((flags, join_pid))
}

/// Bind sources that are relative are relative to the sandbox share.
fn resolve_bind_sources(spec: &mut Spec) -> Result<(), ContainerError> {
    let Some(mounts) = spec.mounts_mut() else {
        return Ok(());
    };
    for m in mounts.iter_mut() {
        let is_bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if !is_bind {
            continue;
        }
        if let Some(source) = m.source().clone() {
            if source.is_relative() {
                m.set_source(Some(spec::join_under(Path::new(SHARED_DIR), &source)?));
            }
        }
    }
    Ok(())
}

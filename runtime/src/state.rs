//! The runtime's records on disk, under one state root (`/run/brig` by default):
//!
//! - `sandboxes/<id>/`: a microVM's directory (its vsock socket, console and VMM logs, the
//!   virtio-fs share) with `sandbox.json`, the record [`crate::Sandbox::open`] reads;
//! - `containers/<id>/`: a container's `state.json` (and, for the CLI, its logs);
//! - `v/<key>`: a link to `sandboxes/<id>`, a short path to the VMM's vsock sockets (see
//!   [`Layout::vsock_uds`]).
//!
//! Every record is written atomically (a temporary file renamed over the old one), and every
//! PID in it carries the process's start time, so a PID the kernel reused for another process
//! is never taken for ours, let alone signalled. IDs are checked before any path is built
//! from them.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use oci_spec::runtime::Process;
use serde::{Deserialize, Serialize};

/// The longest ID accepted: containerd's and Kubernetes' IDs are 64 hex digits, and longer
/// ones would push the sandbox's socket paths past what a Unix socket address holds.
pub const MAX_ID_LEN: usize = 64;

/// The longest path a Unix socket address holds (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Errors reading or writing records.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ID that cannot name a directory.
    #[error(
        "invalid {kind} id {id:?}: use letters, digits, '_', '+', '-' and '.' (not '.' or '..' alone), at most {MAX_ID_LEN} characters"
    )]
    BadId {
        /// "container" or "sandbox".
        kind: &'static str,
        /// The ID as given.
        id: String,
    },
    /// No record with this ID.
    #[error("{kind} {id} does not exist")]
    NotFound {
        /// "container" or "sandbox".
        kind: &'static str,
        /// The ID.
        id: String,
    },
    /// A record with this ID exists already.
    #[error("a {kind} named {id} already exists")]
    Exists {
        /// "container" or "sandbox".
        kind: &'static str,
        /// The ID.
        id: String,
    },
    /// A record could not be read, parsed or written.
    #[error("{action} {path}: {reason}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
}

/// Check an ID by runc's rules (letters, digits, `_ + - .`; not `.` or `..`), and its length.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadId {
            kind,
            id: id.to_string(),
        })
    }
}

/// A process as recorded: its PID and its start time (clock ticks after boot, field 22 of
/// `/proc/<pid>/stat`), which tell it apart from a later process given the same PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRef {
    /// The PID.
    pub pid: u32,
    /// Its start time.
    pub start_time: u64,
}

/// Start time and whether the process is a zombie, from `/proc/<pid>/stat`.
fn read_stat(pid: u32) -> Option<(u64, bool)> {
    read_stat_fields(pid).map(|(start, zombie, _)| (start, zombie))
}

/// Start time, whether the process is a zombie, and its parent's PID.
fn read_stat_fields(pid: u32) -> Option<(u64, bool, u32)> {
    let mut stat = String::new();
    std::fs::File::open(format!("/proc/{pid}/stat"))
        .ok()?
        .read_to_string(&mut stat)
        .ok()?;
    // The command name is in parentheses and may itself hold spaces and ')'.
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split(' ').collect();
    // `rest` starts at field 3 (state); the start time is field 22.
    let start_time = fields.get(19)?.parse().ok()?;
    let ppid = fields.get(1)?.parse().ok()?;
    Some((start_time, fields.first() == Some(&"Z"), ppid))
}

impl ProcessRef {
    /// The live process `pid`, as it is now.
    pub fn of(pid: u32) -> Option<Self> {
        let (start_time, _) = read_stat(pid)?;
        Some(Self { pid, start_time })
    }

    /// This process itself.
    pub fn current() -> Self {
        Self::of(std::process::id()).unwrap_or(Self {
            pid: std::process::id(),
            start_time: 0,
        })
    }

    /// Whether this very process still runs (not exited, not a zombie, PID not reused).
    pub fn alive(&self) -> bool {
        matches!(read_stat(self.pid), Some((start, false)) if start == self.start_time)
    }

    /// The live children of this process (of its main thread), each checked to be ours after
    /// its start time was read, so a PID reused in between is not taken for a child.
    pub fn children(&self) -> Vec<Self> {
        if !self.alive() {
            return Vec::new();
        }
        let list = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid))
            .unwrap_or_default();
        list.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter_map(|pid| {
                let (start_time, zombie, ppid) = read_stat_fields(pid)?;
                (ppid == self.pid && !zombie).then_some(Self { pid, start_time })
            })
            .collect()
    }

    /// Whether the PID is gone from the process table (a zombie still counts as present).
    pub fn gone(&self) -> bool {
        !matches!(read_stat(self.pid), Some((start, _)) if start == self.start_time)
    }

    /// Send `signal` if this process still runs. Returns whether it was sent. A pidfd is
    /// opened first and the start time checked through it, so the signal cannot reach a
    /// process that took the PID between the check and the send.
    pub fn signal(&self, signal: i32) -> std::io::Result<bool> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(e)
            };
        }
        let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd_open: bad fd"))?;
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        if !self.alive() {
            return Ok(false);
        }
        // SAFETY: the descriptor is a valid pidfd; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            Ok(true)
        } else {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// A container's lifecycle state, with the OCI runtime spec's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being set up.
    Creating,
    /// Set up; its command has not started.
    Created,
    /// Its command runs.
    Running,
    /// Frozen.
    Paused,
    /// Its command has exited (or its sandbox is gone).
    Stopped,
}

impl Status {
    /// The word `brig ps` and the OCI `state` command show.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }
}

/// The record of a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container ID.
    pub id: String,
    /// The sandbox whose microVM runs it.
    pub sandbox_id: String,
    /// Its command line.
    pub command: Vec<String>,
    /// Where it is in its lifecycle.
    pub status: Status,
    /// The host process that holds its sandbox and relays its stdio (`brig run`), if any:
    /// when that process is gone, so is the container.
    pub owner: Option<ProcessRef>,
    /// The VMM of its sandbox.
    pub vmm: Option<ProcessRef>,
    /// Exit status once stopped (the code, or 128 + signal).
    pub exit_code: Option<i32>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
    /// Its init process as created (user, environment, working directory): what an exec
    /// inherits unless told otherwise.
    pub process: Option<Process>,
    /// Its init process's PID in the guest, once created: where the guest's `/proc` shows
    /// the namespaces that other containers of its pod join.
    #[serde(default)]
    pub guest_pid: Option<u32>,
    /// The OCI bundle it was created from (the OCI runtime CLI's `create --bundle`).
    #[serde(default)]
    pub bundle: Option<PathBuf>,
    /// Its spec's annotations, as the OCI `state` command shows them.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The image it was made from (`brig run IMAGE`), as the image store names it.
    #[serde(default)]
    pub image: Option<String>,
    /// The scratch directory of its overlay root filesystem (see [`crate::rootfs`]),
    /// unmounted and removed with the container.
    #[serde(default)]
    pub scratch: Option<PathBuf>,
}

impl ContainerState {
    /// A new record of a container being created in `sandbox_id`.
    pub fn new(id: &str, sandbox_id: &str, process: Option<Process>) -> Self {
        let command = process
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default();
        Self {
            id: id.to_string(),
            sandbox_id: sandbox_id.to_string(),
            command,
            status: Status::Creating,
            owner: None,
            vmm: None,
            exit_code: None,
            created: now(),
            process,
            guest_pid: None,
            bundle: None,
            annotations: BTreeMap::new(),
            image: None,
            scratch: None,
        }
    }

    /// Whether the container can still run anything (its status says so, and its owner and
    /// VMM still exist).
    fn live(&self) -> bool {
        let present = |p: &Option<ProcessRef>| p.as_ref().is_none_or(ProcessRef::alive);
        present(&self.owner) && present(&self.vmm)
    }
}

/// The state root and the paths under it.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The state root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where sandboxes live.
    pub fn sandboxes(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// A sandbox's directory (`id` must be valid: see [`validate_id`]).
    pub fn sandbox(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }

    /// The short link to sandbox `id`'s directory: `v/KEY`, KEY being 16 hex digits of a
    /// hash of the ID (FNV-1a, stable across builds).
    pub fn vsock_link(&self, id: &str) -> PathBuf {
        let key = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        self.root.join("v").join(format!("{key:016x}"))
    }

    /// The VMM's hybrid vsock socket of sandbox `id`, through [`Self::vsock_link`]: a Unix
    /// socket address holds at most [`MAX_SOCKET_PATH`] bytes, and
    /// `sandboxes/<64-character ID>/vsock.sock_<port>` under a root such as the shim's
    /// `/run/brig/containerd/k8s.io` does not fit. The socket itself is in the sandbox's
    /// directory (which the VMM sees as its root).
    pub fn vsock_uds(&self, id: &str) -> PathBuf {
        self.vsock_link(id).join("vsock.sock")
    }

    /// A container's directory (`id` must be valid: see [`validate_id`]).
    pub fn container(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    /// IDs of all recorded containers, sorted.
    pub fn container_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.root.join("containers"))
            .map(|it| {
                it.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.retain(|id| validate_id("container", id).is_ok());
        ids.sort();
        ids
    }

    /// Make a container's directory and its first record; fails if the ID is taken.
    pub fn create_container(&self, state: &ContainerState) -> Result<(), StateError> {
        validate_id("container", &state.id)?;
        let dir = self.container(&state.id);
        let parent = self.root.join("containers");
        std::fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists {
                    kind: "container",
                    id: state.id.clone(),
                })
            }
            Err(e) => return Err(io_err("creating", &dir)(e)),
        }
        self.save(state)
    }

    /// A container's record. A container whose owner or VMM is gone reads as stopped.
    pub fn load(&self, id: &str) -> Result<ContainerState, StateError> {
        validate_id("container", id)?;
        let path = self.container(id).join("state.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound {
                    kind: "container",
                    id: id.to_string(),
                })
            }
            Err(e) => return Err(io_err("reading", &path)(e)),
        };
        let mut state: ContainerState =
            serde_json::from_str(&text).map_err(|e| StateError::Io {
                action: "parsing",
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if state.status != Status::Stopped && !state.live() {
            state.status = Status::Stopped;
        }
        Ok(state)
    }

    /// Record a container's state (atomically).
    pub fn save(&self, state: &ContainerState) -> Result<(), StateError> {
        validate_id("container", &state.id)?;
        write_atomically(&self.container(&state.id).join("state.json"), state)
    }

    /// Forget a container: remove its directory and everything in it.
    pub fn remove_container(&self, id: &str) -> Result<(), StateError> {
        validate_id("container", id)?;
        let dir = self.container(id);
        // Its overlay first: the record is the only thing that names it.
        if let Some(scratch) = self.load(id).ok().and_then(|s| s.scratch) {
            crate::rootfs::remove_overlay(&scratch).map_err(|e| StateError::Io {
                action: "removing the root filesystem of",
                path: dir.clone(),
                reason: e.to_string(),
            })?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &dir)(e)),
        }
    }
}

/// Write `value` as JSON to `path` through a temporary file renamed over it.
pub(crate) fn write_atomically<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Io {
        action: "encoding",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(&tmp, bytes).map_err(io_err("writing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("writing", path))
}

/// Read a JSON record.
pub(crate) fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StateError> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
    serde_json::from_str(&text).map_err(|e| StateError::Io {
        action: "parsing",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |e| StateError::Io {
        action,
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_runcs_rules_before_any_path_is_built() {
        for good in [
            "pod-1_a.b",
            "a+b",
            "0123456789abcdef",
            &"x".repeat(MAX_ID_LEN),
        ] {
            assert!(validate_id("container", good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../etc",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(validate_id("container", bad).is_err(), "{bad:?}");
        }
        let layout = Layout::new(Path::new("/nonexistent-root"));
        assert!(matches!(
            layout.load("../../etc"),
            Err(StateError::BadId { .. })
        ));
    }

    #[test]
    fn a_reused_pid_is_not_the_recorded_process() {
        let me = ProcessRef::current();
        assert!(me.alive() && !me.gone());
        let reused = ProcessRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !reused.alive(),
            "a different start time is a different process"
        );
        assert!(reused.gone());
        assert!(
            !reused.signal(0).unwrap(),
            "no signal for a process that is not ours"
        );
        assert!(me.signal(0).unwrap());
    }

    #[test]
    fn a_dead_child_is_neither_alive_nor_signalled() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let r = ProcessRef::of(child.id()).unwrap();
        child.wait().unwrap();
        assert!(!r.alive() && r.gone());
        assert!(!r.signal(libc::SIGKILL).unwrap());
    }

    #[test]
    fn records_round_trip_and_a_dead_owner_reads_as_stopped() {
        let root = std::env::temp_dir().join(format!("brig-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let layout = Layout::new(&root);
        let mut state = ContainerState::new("c1", "c1", None);
        layout.create_container(&state).unwrap();
        assert!(matches!(
            layout.create_container(&state),
            Err(StateError::Exists { .. })
        ));
        state.status = Status::Running;
        state.owner = Some(ProcessRef::current());
        layout.save(&state).unwrap();
        assert_eq!(layout.load("c1").unwrap().status, Status::Running);
        state.owner = Some(ProcessRef {
            start_time: state.owner.unwrap().start_time + 1,
            ..state.owner.unwrap()
        });
        layout.save(&state).unwrap();
        assert_eq!(layout.load("c1").unwrap().status, Status::Stopped);
        assert_eq!(layout.container_ids(), vec!["c1".to_string()]);
        assert!(matches!(
            layout.load("c2"),
            Err(StateError::NotFound { .. })
        ));
        layout.remove_container("c1").unwrap();
        assert!(layout.container_ids().is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }
}

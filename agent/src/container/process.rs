//! Starting a container process (the agent binary re-executed as `__container-init`) and
//! following it until it exits.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sched::CloneFlags;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::credentials;
use super::init::INIT_ARG;
use super::spec::{InitConfig, InitReport, InitReportFailure};
use super::stdio::StdioHandles;
use super::userns::IdMappings;
use super::ContainerError;
use crate::reaper::Reaper;

/// Stack of the cloned child; it only calls read, set*id, dup2 and execve.
const CLONE_STACK_SIZE: usize = 64 * 1024;
/// Lowest fd number the child's fds are parked at before clone, above the targets 0..=6.
const PARKED_FD_MIN: RawFd = 16;
/// Exit statuses of the cloned child when it fails before executing the init.
const EXIT_DUP: i32 = 120;
const EXIT_EXEC: i32 = 121;
const EXIT_NO_MAPPINGS: i32 = 122;
const EXIT_NOT_ROOT: i32 = 123;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal.
    pub status: i32,
    /// The killing signal, 0 if it exited.
    pub signal: u32,
    /// The container's cgroup saw an OOM kill while it ran.
    pub oom_killed: bool,
}

impl ExitInfo {
    fn from_wait_status(status: WaitStatus) -> ExitInfo {
        let (status, signal) = match status {
            WaitStatus::Exited(_, code) => (code, 0),
            WaitStatus::Signaled(_, signal, _) => (128 + signal as i32, signal as u32),
            _ => (255, 0),
        };
        ExitInfo {
            status,
            signal,
            oom_killed: false,
        }
    }
}

/// A container init or exec process, from the agent's side.
pub struct Process {
    /// Its pid in the agent's (the guest's) pid namespace.
    pub pid: Pid,
    /// Its stdio streams.
    pub stdio: StdioHandles,
    exit: Mutex<Option<ExitInfo>>,
    exited: Condvar,
}

impl Process {
    /// Follows `pid` until it exits: a thread takes its status from the reaper, waits for its
    /// output streams to be flushed, then records the exit.
    pub fn follow(
        pid: Pid,
        statuses: Receiver<WaitStatus>,
        mut stdio: StdioHandles,
        oom_kills: impl Fn() -> u64 + Send + 'static,
    ) -> Arc<Process> {
        let pumps = stdio.take_output_pumps();
        let process = Arc::new(Process {
            pid,
            stdio,
            exit: Mutex::new(None),
            exited: Condvar::new(),
        });
        let oom_before = oom_kills();
        let follower = Arc::clone(&process);
        let spawned = std::thread::Builder::new()
            .name(format!("wait-{pid}"))
            .spawn(move || {
                let status = loop {
                    match statuses.recv() {
                        Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                            break Some(status)
                        }
                        Ok(_) => continue,
                        Err(_) => break None,
                    }
                };
                let mut info = match status {
                    Some(status) => ExitInfo::from_wait_status(status),
                    None => ExitInfo {
                        status: 255,
                        signal: 0,
                        oom_killed: false,
                    },
                };
                info.oom_killed = oom_kills() > oom_before;
                for pump in pumps {
                    let _ = pump.join();
                }
                follower.stdio.close_stdin();
                crate::debug!("process {pid} exited: {info:?}");
                follower.set_exit(info);
            });
        if let Err(err) = spawned {
            crate::error!("cannot start the wait thread of process {pid}: {err}");
        }
        process
    }

    fn set_exit(&self, info: ExitInfo) {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(info);
        self.exited.notify_all();
    }

    /// The exit, if it happened.
    pub fn exit(&self) -> Option<ExitInfo> {
        *self.exit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until the process exited and its output was flushed.
    pub fn wait(&self) -> ExitInfo {
        let mut exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(info) = *exit {
                return info;
            }
            exit = self
                .exited
                .wait(exit)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Like [`Process::wait`] but gives up after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitInfo> {
        let exit = self.exit.lock().unwrap_or_else(PoisonError::into_inner);
        let (exit, _) = self
            .exited
            .wait_timeout_while(exit, timeout, |exit| exit.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        *exit
    }
}

/// A process that has been cloned and has read its config, stopped before its command.
pub struct Spawned {
    /// Its pid.
    pub pid: Pid,
    /// Its exit statuses.
    pub statuses: Receiver<WaitStatus>,
    /// Write end of the start pipe.
    start: File,
    /// Read end of the status pipe.
    status: BufReader<File>,
}

/// How to clone the process.
pub struct SpawnOptions {
    /// Namespaces to create with clone (CLONE_NEW*).
    pub clone_flags: CloneFlags,
    /// Pid namespace to join before cloning (`/proc/PID/ns/pid`): the child is born in it.
    pub join_pid_ns: Option<PathBuf>,
    /// With CLONE_NEWUSER: the mappings to write before the child executes the init.
    pub id_mappings: Option<IdMappings>,
}

/// Clones the re-executed agent with `options`, lets `before_config` act on its pid (join
/// the cgroup), sets its rlimits, sends it `config` and waits until it reports that it is
/// ready to start.
///
/// In a new user namespace the cloned child waits on a pipe before it executes the init:
/// until its uid and gid maps are written it is nobody there, and an exec would drop its
/// capabilities. The agent writes the maps, then one byte; the child becomes root of the
/// namespace (container ID 0, which [`IdMappings`] requires to be mapped) and executes the
/// init with every capability in it. Rlimits are set from here, as runc does: inside a user
/// namespace a process can no longer raise its hard limits.
pub fn spawn(
    reaper: &Arc<Reaper>,
    options: SpawnOptions,
    child_stdio: [OwnedFd; 3],
    console_socket: Option<OwnedFd>,
    config: &InitConfig,
    before_config: impl FnOnce(Pid) -> Result<(), ContainerError>,
) -> Result<Spawned, ContainerError> {
    let internal = |what: &str, err: &dyn std::fmt::Display| {
        ContainerError::Internal(format!("cannot start the container process: {what}: {err}"))
    };
    let config_json = serde_json::to_vec(config).map_err(|err| internal("config", &err))?;
    let (config_read, config_write) = pipe().map_err(|err| internal("pipe", &err))?;
    let (status_read, status_write) = pipe().map_err(|err| internal("pipe", &err))?;
    let (start_read, start_write) = pipe().map_err(|err| internal("pipe", &err))?;

    // Park every fd the child needs above the target numbers, so the child's dup2 calls
    // cannot clobber one another.
    let [stdin, stdout, stderr] = child_stdio;
    let mut sources = vec![stdin, stdout, stderr, config_read, status_write, start_read];
    // fd 6 (CONSOLE_FD) when the process opens a terminal.
    sources.extend(console_socket);
    let mut parked = Vec::with_capacity(sources.len());
    for fd in &sources {
        let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(PARKED_FD_MIN))
            .map_err(|err| internal("dup", &err))?;
        // SAFETY: fcntl just returned this new fd; nothing else owns it.
        parked.push(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    drop(sources);
    let parked_raw: Vec<RawFd> = parked.iter().map(|fd| fd.as_raw_fd()).collect();
    // The user namespace's go-ahead: read by the child before exec, parked out of the way of
    // the dup2 targets, close-on-exec.
    let (userns_wait, userns_go) = match &options.id_mappings {
        Some(_) => {
            let (read, write) = pipe().map_err(|err| internal("pipe", &err))?;
            let raw = fcntl(&read, FcntlArg::F_DUPFD_CLOEXEC(PARKED_FD_MIN))
                .map_err(|err| internal("dup", &err))?;
            // SAFETY: fcntl just returned this new fd; nothing else owns it.
            let parked_read = unsafe { OwnedFd::from_raw_fd(raw) };
            (Some(parked_read), Some(File::from(write)))
        }
        None => (None, None),
    };
    let userns_wait_raw = userns_wait.as_ref().map(|fd| fd.as_raw_fd());

    // Everything the child touches is allocated here, before clone.
    let exe = CString::new("/proc/self/exe").map_err(|err| internal("exe", &err))?;
    let arg0 = CString::new("brig-agent").map_err(|err| internal("argv", &err))?;
    let arg1 = CString::new(INIT_ARG).map_err(|err| internal("argv", &err))?;
    let mut stack = vec![0u8; CLONE_STACK_SIZE];

    let clone_flags = options.clone_flags;
    let do_clone = move || -> Result<Pid, ContainerError> {
        if let Some(path) = &options.join_pid_ns {
            let ns = File::open(path)
                .map_err(|err| internal(&format!("open {}", path.display()), &err))?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWPID)
                .map_err(|err| internal("setns(pid)", &err))?;
        }
        let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        let exe_ptr = exe.as_ptr();
        let clone_child = move || -> isize {
            // Only async-signal-safe calls: this is a copy of a multi-threaded process.
            if let Some(fd) = userns_wait_raw {
                if !wait_for_id_maps(fd) {
                    // SAFETY: _exit is async-signal-safe and never returns.
                    unsafe { libc::_exit(EXIT_NO_MAPPINGS) };
                }
                if !become_userns_root() {
                    // SAFETY: as above.
                    unsafe { libc::_exit(EXIT_NOT_ROOT) };
                }
            }
            for (target, source) in parked_raw.iter().enumerate() {
                // SAFETY: dup2 on fds open in this process (parked above); targets are 0..=6.
                if unsafe { libc::dup2(*source, target as RawFd) } < 0 {
                    // SAFETY: _exit is async-signal-safe and never returns.
                    unsafe { libc::_exit(EXIT_DUP) };
                }
            }
            // SAFETY: exe, argv and envp are NUL-terminated C strings/arrays that outlive
            // the call (the CStrings are owned by the enclosing closure).
            unsafe { libc::execve(exe_ptr, argv.as_ptr(), envp.as_ptr()) };
            // SAFETY: as above.
            unsafe { libc::_exit(EXIT_EXEC) }
        };
        // SAFETY: the child runs only `clone_child` (read, raw set*id syscalls, dup2, execve,
        // _exit), which is async-signal-safe and uses memory prepared before the clone; the
        // stack is ours and lives until clone returns in the parent (the child has its own
        // copy of it).
        unsafe {
            nix::sched::clone(
                Box::new(clone_child),
                &mut stack,
                clone_flags,
                Some(libc::SIGCHLD),
            )
        }
        .map_err(|err| {
            internal(
                "clone",
                &format!("{err} (namespaces {clone_flags:?}; is the container's init alive?)"),
            )
        })
    };

    // Joining a pid namespace changes this thread for good: do it on a thread of its own.
    let (pid, statuses) = std::thread::scope(|scope| {
        scope
            .spawn(|| reaper.spawn_watched(do_clone))
            .join()
            .unwrap_or_else(|_| Err(internal("clone", &"the clone thread panicked")))
    })?;
    drop(parked);
    drop(userns_wait);

    let abort = |err: ContainerError| {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        err
    };
    if let (Some(mappings), Some(mut go)) = (&options.id_mappings, userns_go) {
        mappings.write(pid).map_err(abort)?;
        go.write_all(b"U").map_err(|err| {
            abort(internal(
                "releasing the process into its user namespace",
                &err,
            ))
        })?;
    }
    before_config(pid).map_err(abort)?;
    if let Some(process) = config.spec.process() {
        credentials::apply_rlimits(pid, process)
            .map_err(|err| abort(ContainerError::InvalidArgument(err)))?;
    }
    let mut config_write = File::from(config_write);
    config_write
        .write_all(&config_json)
        .map_err(|err| abort(internal("sending the config", &err)))?;
    drop(config_write);

    let mut spawned = Spawned {
        pid,
        statuses,
        start: File::from(start_write),
        status: BufReader::new(File::from(status_read)),
    };
    match spawned.read_report() {
        Some(InitReport::Ready) => Ok(spawned),
        Some(InitReport::Failed { code, message }) => {
            Err(abort(InitReportFailure { code, message }.into()))
        }
        None => Err(abort(ContainerError::Internal(format!(
            "the container process {pid} exited during setup without a report{}",
            spawned.exit_note()
        )))),
    }
}

impl Spawned {
    fn read_report(&mut self) -> Option<InitReport> {
        let mut line = String::new();
        match self.status.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    fn exit_note(&self) -> String {
        match self.statuses.recv_timeout(Duration::from_secs(2)) {
            Ok(status @ WaitStatus::Exited(_, code)) => {
                let why = match code {
                    EXIT_DUP => ": it could not set up its fds",
                    EXIT_EXEC => ": it could not execute /proc/self/exe",
                    EXIT_NO_MAPPINGS => ": it was not given its user namespace's mappings",
                    EXIT_NOT_ROOT => {
                        ": it could not become root of its user namespace (setresgid, \
                         setresuid or setgroups to container ID 0 failed)"
                    }
                    _ => "",
                };
                format!(" ({status:?}{why})")
            }
            Ok(status) => format!(" ({status:?})"),
            Err(_) => String::new(),
        }
    }

    /// Splits off what [`Spawned::start`] needs; the statuses go to [`Process::follow`].
    pub fn into_parts(self) -> (Pid, Receiver<WaitStatus>, Starter) {
        (
            self.pid,
            self.statuses,
            Starter {
                pid: self.pid,
                start: self.start,
                status: self.status,
            },
        )
    }
}

/// Releases a ready process into its command.
pub struct Starter {
    pid: Pid,
    start: File,
    status: BufReader<File>,
}

impl Starter {
    /// Tells the process to execute its command and waits until it did (its status pipe
    /// closes on exec) or reports why it could not.
    pub fn start(mut self) -> Result<(), ContainerError> {
        self.start.write_all(b"S").map_err(|err| {
            ContainerError::FailedPrecondition(format!(
                "the container process {} is gone: {err}",
                self.pid
            ))
        })?;
        let mut rest = String::new();
        let _ = self.status.read_to_string(&mut rest);
        match rest.lines().next().map(serde_json::from_str::<InitReport>) {
            None => Ok(()),
            Some(Ok(InitReport::Failed { code, message })) => {
                Err(InitReportFailure { code, message }.into())
            }
            Some(_) => Err(ContainerError::Internal(format!(
                "unexpected report from container process {}: {rest:?}",
                self.pid
            ))),
        }
    }
}

/// In the cloned child: blocks until the agent wrote the user namespace's maps and sent a
/// byte on `fd`. False if the agent gave up (EOF) or the read failed.
fn wait_for_id_maps(fd: RawFd) -> bool {
    let mut byte = 0u8;
    loop {
        // SAFETY: read into a one-byte buffer on the stack from an fd open in this process.
        let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        if n == 1 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return false;
    }
}

/// In the cloned child, once the maps are written: gid, uid and supplementary groups
/// become container ID 0 (the child keeps its kernel IDs of the guest's root otherwise,
/// which the namespace shows as nobody and which would not give it capabilities across exec).
/// Raw syscalls: libc's wrappers would try to change every thread of the agent it was copied
/// from (musl's __synccall), which do not exist in the child.
fn become_userns_root() -> bool {
    // SAFETY: setresgid/setresuid with integer arguments, setgroups with an empty list.
    unsafe {
        libc::syscall(libc::SYS_setresgid, 0, 0, 0) == 0
            && libc::syscall(libc::SYS_setresuid, 0, 0, 0) == 0
            && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
    }
}

fn pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
}

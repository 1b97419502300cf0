//! `brig-agent __container-init`: the agent re-executed as a container's init (or exec)
//! process. Single-threaded, so it may do anything before it executes the command.
//!
//! fds: 0-2 the process's stdio, 3 the config (JSON, read to EOF), 4 the status pipe (one
//! [`InitReport`] per line; close-on-exec, so EOF after a successful exec), 5 the start pipe
//! (a byte = go, EOF = the agent gave up), 6 (terminal only) the console socket: the process
//! opens a pty in the container's devpts, makes the slave its stdio and controlling terminal
//! and sends the master to the agent (SCM_RIGHTS), like runc's --console-socket.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::hooks::{self, HookContext};
use super::spec::{FailureCode, InitConfig, InitMode, InitReport};
use super::{credentials, mounts, seccomp, userns};

/// argv[1] that selects this mode.
pub const INIT_ARG: &str = "__container-init";
/// The config pipe.
pub const CONFIG_FD: RawFd = 3;
/// The status pipe.
pub const STATUS_FD: RawFd = 4;
/// The start pipe.
pub const START_FD: RawFd = 5;
/// The console socket (terminal only): the pty master goes back to the agent on it.
pub const CONSOLE_FD: RawFd = 6;

/// PATH when the process's environment has none (containerd's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Failure {
    code: FailureCode,
    message: String,
}

fn internal(message: impl Into<String>) -> Failure {
    Failure {
        code: FailureCode::Internal,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> Failure {
    Failure {
        code: FailureCode::InvalidArgument,
        message: message.into(),
    }
}

/// Entry point; never returns.
pub fn main() -> ! {
    // SAFETY: the agent hands us fd 4 as the status pipe; we own it from here.
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    let failure = match run(&mut status) {
        Ok(never) => match never {},
        Err(failure) => failure,
    };
    let report = InitReport::Failed {
        code: failure.code,
        message: failure.message,
    };
    if let Ok(line) = serde_json::to_string(&report) {
        let _ = status.write_all(format!("{line}\n").as_bytes());
    }
    let exit = match failure.code {
        FailureCode::NotFound => 127,
        FailureCode::PermissionDenied => 126,
        _ => 125,
    };
    std::process::exit(exit)
}

fn run(status: &mut File) -> Result<Infallible, Failure> {
    // Nothing of the agent's may leak into the container.
    // SAFETY: close_range with plain integer arguments.
    unsafe { libc::syscall(libc::SYS_close_range, CONSOLE_FD as u32 + 1, u32::MAX, 0) };
    set_cloexec(STATUS_FD);
    set_cloexec(CONSOLE_FD);
    let mut config = Vec::new();
    // SAFETY: fd 3 is the config pipe handed to us; we own it.
    let mut config_file = unsafe { File::from_raw_fd(CONFIG_FD) };
    config_file
        .read_to_end(&mut config)
        .map_err(|err| internal(format!("cannot read the container config: {err}")))?;
    drop(config_file);
    let config: InitConfig = serde_json::from_slice(&config)
        .map_err(|err| internal(format!("bad container config from the agent: {err}")))?;
    // The agent blocks SIGCHLD in all its threads; the container starts with a clean mask.
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    );
    let spec = &config.spec;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| invalid("the spec has no process"))?;

    let terminal = process.terminal() == Some(true);
    match config.mode {
        InitMode::Init => setup_container(spec, terminal, process.user().uid())?,
        InitMode::Exec { init_pid } => {
            join_container(init_pid)?;
            if terminal {
                open_terminal(false, process.user().uid())?;
            }
        }
    }
    nix::unistd::setsid().map_err(|err| internal(format!("setsid: {err}")))?;
    if terminal {
        // SAFETY: TIOCSCTTY on our stdin (the pty slave) with an integer argument.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(internal(format!(
                "cannot make the terminal the controlling tty: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    // Rlimits were set by the agent (see `process::spawn`).

    let mut filters = match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(profile) => seccomp::compile(profile)
            .map_err(|err| invalid(format!("bad seccomp profile: {err}")))?,
        None => Vec::new(),
    };
    // Every container process, init or exec, profile or not: no AF_VSOCK. Last, so that its
    // EPERM is the answer even where the profile has an errno of its own for socket().
    filters.push(seccomp::deny_vsock().map_err(internal)?);
    // And no io_uring, whose rings make sockets without the socket() call seccomp sees.
    filters.push(seccomp::deny_io_uring().map_err(internal)?);
    let no_new_privileges = process.no_new_privileges() == Some(true);
    if !no_new_privileges {
        // Without no_new_privs, installing needs CAP_SYS_ADMIN, which the user may not keep.
        seccomp::install(&filters)
            .map_err(|err| internal(format!("cannot install the seccomp profile: {err}")))?;
    }
    credentials::switch_user(process).map_err(invalid)?;
    let cwd = process.cwd();
    nix::unistd::chdir(cwd.as_path()).map_err(|err| {
        invalid(format!(
            "cannot change to the working directory {}: {err}",
            cwd.display()
        ))
    })?;
    let args = process.args().clone().unwrap_or_default();
    let env = process.env().clone().unwrap_or_default();
    let command = args.first().cloned().unwrap_or_default();
    let path = look_up(&command, &env)?;
    if no_new_privileges {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(internal(format!(
                "cannot set no_new_privs: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    let c_path = cstring(path.as_os_str().as_bytes())?;
    let c_args = args
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env
        .iter()
        .map(|e| cstring(e.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;

    let ready = serde_json::to_string(&InitReport::Ready).unwrap_or_default();
    status
        .write_all(format!("{ready}\n").as_bytes())
        .map_err(|err| internal(format!("cannot report to the agent: {err}")))?;
    // SAFETY: fd 5 is the start pipe handed to us; we own it.
    let mut start = unsafe { File::from_raw_fd(START_FD) };
    let mut byte = [0u8; 1];
    match start.read(&mut byte) {
        Ok(1) => {}
        // The agent gave up on this container (or died).
        _ => std::process::exit(1),
    }
    drop(start);

    if no_new_privileges {
        seccomp::install(&filters)
            .map_err(|err| internal(format!("cannot install the seccomp profile: {err}")))?;
    }
    if let Some(context) = &config.hooks {
        run_start_hooks(spec, context, &env)?;
    }
    let mut argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = c_env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: NUL-terminated strings and arrays that live across the call.
    unsafe { libc::execve(c_path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    let err = std::io::Error::last_os_error();
    Err(exec_failure(&command, &err))
}

/// The spec's `startContainer` hooks, here in the container as its user, right before its
/// command (see `hooks`). A failure is the start's: also told on the container's stderr,
/// where its own output would have gone.
fn run_start_hooks(spec: &Spec, context: &HookContext, env: &[String]) -> Result<(), Failure> {
    let state = context.state(spec.version(), std::process::id().try_into().unwrap_or(0));
    let state = serde_json::to_vec(&state)
        .map_err(|err| internal(format!("cannot write the hooks' state: {err}")))?;
    hooks::run(hooks::start_hooks(spec), &state, env).map_err(|message| {
        let _ = std::io::stderr().write_all(format!("brig: {message}\n").as_bytes());
        internal(message)
    })
}

fn exec_failure(command: &str, err: &std::io::Error) -> Failure {
    let code = match err.raw_os_error() {
        Some(libc::ENOENT) => FailureCode::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::ENOEXEC) => {
            FailureCode::PermissionDenied
        }
        _ => FailureCode::Internal,
    };
    Failure {
        code,
        message: format!("exec: {command:?}: {err}"),
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, Failure> {
    CString::new(bytes).map_err(|_| invalid("an argument or variable contains a NUL byte"))
}

fn set_cloexec(fd: RawFd) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    // SAFETY: fd is open (handed to us); the borrow does not outlive this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = fcntl(borrowed, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

/// Finds the command like Go's exec.LookPath (runc's messages).
fn look_up(command: &str, env: &[String]) -> Result<PathBuf, Failure> {
    let not_found = || Failure {
        code: FailureCode::NotFound,
        message: format!("exec: {command:?}: executable file not found in $PATH"),
    };
    let denied = || Failure {
        code: FailureCode::PermissionDenied,
        message: format!("exec: {command:?}: permission denied"),
    };
    if command.contains('/') {
        let path = Path::new(command);
        return match std::fs::metadata(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err(Failure {
                code: FailureCode::NotFound,
                message: format!("exec: {command:?}: stat {command}: no such file or directory"),
            }),
            Err(_) => Err(denied()),
            Ok(_) if is_executable(path) => Ok(path.to_path_buf()),
            Ok(_) => Err(denied()),
        };
    }
    let path_var = env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let mut saw_unexecutable = false;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(command);
        if candidate.exists() {
            if is_executable(&candidate) {
                return Ok(candidate);
            }
            saw_unexecutable = true;
        }
    }
    if saw_unexecutable {
        Err(denied())
    } else {
        Err(not_found())
    }
}

/// A regular file that the (already switched) user may execute.
fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return false;
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok()
}

/// Init mode: namespaces to join or create beyond clone's, mounts, rootfs, hostname, sysctl.
fn setup_container(spec: &Spec, terminal: bool, uid: u32) -> Result<(), Failure> {
    let namespaces = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default();
    for ns in &namespaces {
        let flag = namespace_flag(ns.typ());
        match ns.path() {
            // A pid namespace to join was entered by the agent before clone.
            Some(_) if ns.typ() == LinuxNamespaceType::Pid => {}
            Some(path) if path.exists() => {
                let file = File::open(path)
                    .map_err(|err| invalid(format!("cannot open {}: {err}", path.display())))?;
                nix::sched::setns(&file, flag).map_err(|err| {
                    invalid(format!("cannot join namespace {}: {err}", path.display()))
                })?;
            }
            Some(_) => {}
            // Created after the agent moved us into the container's cgroup, so the cgroup
            // namespace is rooted there.
            None if ns.typ() == LinuxNamespaceType::Cgroup => {
                nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
                    .map_err(|err| internal(format!("cannot create a cgroup namespace: {err}")))?;
            }
            None => {}
        }
    }
    let rootfs = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .ok_or_else(|| invalid("the spec has no root"))?;
    mounts::prepare_rootfs(spec, &rootfs, userns::asks_for_new(spec)).map_err(internal)?;
    mounts::enter_rootfs(&rootfs).map_err(internal)?;
    if terminal {
        open_terminal(true, uid)?;
    }
    if let Some(sysctls) = spec.linux().as_ref().and_then(|l| l.sysctl().as_ref()) {
        for (key, value) in sysctls {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value)
                .map_err(|err| invalid(format!("cannot set sysctl {key}={value}: {err}")))?;
        }
    }
    mounts::finish(spec).map_err(internal)?;
    if let Some(hostname) = spec.hostname() {
        nix::unistd::sethostname(hostname)
            .map_err(|err| invalid(format!("cannot set hostname {hostname:?}: {err}")))?;
    }
    Ok(())
}

/// Opens a pty in the container's devpts (`/dev/ptmx`, in the container's root and mount
/// namespace, so the slave is `/dev/pts/N` there), makes the slave fds 0, 1 and 2 (the
/// caller makes it the controlling terminal after setsid), binds it on /dev/console
/// (`bind_console`, init only) and sends the master to the agent on [`CONSOLE_FD`].
fn open_terminal(bind_console: bool, uid: u32) -> Result<(), Failure> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use nix::sys::stat::Mode;
    use std::os::fd::{AsRawFd, OwnedFd};
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = open("/dev/ptmx", flags, Mode::empty())
        .or_else(|_| open("/dev/pts/ptmx", flags, Mode::empty()))
        .map_err(|err| {
            internal(format!(
                "cannot open the container's /dev/ptmx for the terminal: {err} (does the \
                 spec mount devpts on /dev/pts?)"
            ))
        })?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the valid pointer; the fd is open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } < 0 {
        return Err(internal(format!(
            "cannot unlock the pty: {}",
            std::io::Error::last_os_error()
        )));
    }
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int to the valid pointer; the fd is open.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) } < 0 {
        return Err(internal(format!(
            "cannot get the pty number: {}",
            std::io::Error::last_os_error()
        )));
    }
    let slave_path = PathBuf::from(format!("/dev/pts/{number}"));
    // TIOCGPTPEER opens the slave through the master's own devpts instance; by path as a
    // fallback for kernels before 4.13.
    // SAFETY: TIOCGPTPEER takes open flags as an integer and returns a new fd.
    let peer = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let slave = if peer >= 0 {
        // SAFETY: the ioctl just returned this new fd; nothing else owns it.
        unsafe { <OwnedFd as FromRawFd>::from_raw_fd(peer) }
    } else {
        open(&slave_path, flags, Mode::empty())
            .map_err(|err| internal(format!("cannot open {}: {err}", slave_path.display())))?
    };
    if uid != 0 {
        // The user's terminal, as runc does; the group (tty) stays.
        nix::unistd::fchown(&slave, Some(nix::unistd::Uid::from_raw(uid)), None)
            .map_err(|err| internal(format!("cannot chown {}: {err}", slave_path.display())))?;
    }
    for target in 0..=2 {
        // SAFETY: dup2 between open fds.
        if unsafe { libc::dup2(slave.as_raw_fd(), target) } < 0 {
            return Err(internal(format!(
                "cannot make the terminal fd {target}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    drop(slave);
    if bind_console {
        mounts::bind_console(&slave_path).map_err(internal)?;
    }
    let fds = [master.as_raw_fd()];
    let cmsgs = [ControlMessage::ScmRights(&fds)];
    let iov = [std::io::IoSlice::new(b"t")];
    loop {
        match sendmsg::<()>(CONSOLE_FD, &iov, &cmsgs, MsgFlags::empty(), None) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => {
                return Err(internal(format!(
                    "cannot send the terminal to the agent: {err}"
                )))
            }
        }
    }
    drop(master);
    // SAFETY: fd 6 is the console socket handed to us; nothing else uses it.
    unsafe { libc::close(CONSOLE_FD) };
    Ok(())
}

/// Exec mode: enter the namespaces and root of the container's init (the agent already put
/// us in its pid namespace and cgroup). Its user namespace comes first, when it has its own:
/// the others belong to it, and joining them needs its capabilities. Namespaces the container
/// shares with the agent are not joined again (a guest-owned one could not be joined from
/// inside the container's user namespace).
fn join_container(init_pid: i32) -> Result<(), Failure> {
    let proc_dir = PathBuf::from(format!("/proc/{init_pid}"));
    let open = |name: &str| {
        let path = proc_dir.join(name);
        File::open(&path).map_err(|err| {
            internal(format!(
                "cannot open {} (has the container stopped?): {err}",
                path.display()
            ))
        })
    };
    let root = open("root")?;
    let mut namespaces = Vec::new();
    for (name, flag) in [
        ("ns/user", CloneFlags::CLONE_NEWUSER),
        ("ns/cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("ns/ipc", CloneFlags::CLONE_NEWIPC),
        ("ns/uts", CloneFlags::CLONE_NEWUTS),
        ("ns/net", CloneFlags::CLONE_NEWNET),
        ("ns/mnt", CloneFlags::CLONE_NEWNS),
    ] {
        let file = open(name)?;
        // Decided before joining any: /proc/self changes meaning with the mount namespace.
        if !same_namespace(&file, name)? {
            namespaces.push((name, file, flag));
        }
    }
    for (name, file, flag) in &namespaces {
        nix::sched::setns(file, *flag)
            .map_err(|err| internal(format!("cannot join the container's {name}: {err}")))?;
        if *flag == CloneFlags::CLONE_NEWUSER {
            become_root().map_err(|err| {
                internal(format!(
                    "cannot become root (container ID 0) in the container's user namespace: \
                     {err}"
                ))
            })?;
        }
    }
    // The mount namespace's root may lie under the container's root (no pivot_root
    // possible from the initramfs): take the init's root itself.
    nix::unistd::fchdir(&root).map_err(|err| internal(format!("cannot enter the root: {err}")))?;
    nix::unistd::chroot(".").map_err(|err| internal(format!("cannot chroot: {err}")))?;
    nix::unistd::chdir("/").map_err(|err| internal(format!("cannot chdir: {err}")))?;
    Ok(())
}

/// Whether the namespace `file` (`/proc/PID/ns/NAME`) is the one this process is in.
fn same_namespace(file: &File, name: &str) -> Result<bool, Failure> {
    use std::os::unix::fs::MetadataExt;
    let theirs = file
        .metadata()
        .map_err(|err| internal(format!("cannot stat the container's {name}: {err}")))?;
    let own = Path::new("/proc/self").join(name);
    let ours = std::fs::metadata(&own)
        .map_err(|err| internal(format!("cannot stat {}: {err}", own.display())))?;
    Ok(theirs.dev() == ours.dev() && theirs.ino() == ours.ino())
}

/// Right after joining a user namespace the process keeps the guest's root IDs, which the
/// namespace shows as nobody: become its root (mapped, checked by the agent), with no
/// supplementary groups, as runc does. The capabilities of the namespace stay.
fn become_root() -> nix::Result<()> {
    use nix::unistd::{Gid, Uid};
    let (uid, gid) = (Uid::from_raw(0), Gid::from_raw(0));
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    nix::unistd::setgroups(&[])
}

/// The clone/setns flag of a namespace type.
pub fn namespace_flag(typ: LinuxNamespaceType) -> CloneFlags {
    match typ {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_namespace_and_capability_brig_features_lists_is_known_here() {
        use brig_protocols::features::{CAPABILITIES, NAMESPACES};
        for name in NAMESPACES {
            let typ: LinuxNamespaceType = serde_json::from_value(serde_json::json!(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!namespace_flag(typ).is_empty(), "{name} is not made");
        }
        for name in CAPABILITIES {
            let _: oci_spec::runtime::Capability = serde_json::from_value(serde_json::json!(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            <caps::Capability as std::str::FromStr>::from_str(name)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

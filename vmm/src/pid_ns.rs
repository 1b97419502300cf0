//! A PID namespace of the VMM's own, as Firecracker's jailer gives its VMM: the process that
//! runs the VM is PID 1 of a fresh namespace, so it can name, signal or trace no process of
//! the host, whatever a guest makes it do.
//!
//! A process cannot move itself into a new PID namespace, only its children. So `brig-vmm`
//! forks once, first thing: the child runs the VM; the parent stays behind as a supervisor
//! that the runtime sees as "the VMM". It holds no capabilities, runs under a filter of a
//! handful of calls, forwards SIGTERM, SIGINT and SIGHUP to the child, and ends as the child
//! ends (the same exit status, or killed by the same signal). The child dies with it
//! (PR_SET_PDEATHSIG), so a SIGKILL to the supervisor still ends the VM.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Errors setting up the namespace (all before the VM exists).
#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error("cannot give the VMM a PID namespace of its own ({step}): {source} (brig-vmm needs CAP_SYS_ADMIN for this; --no-confine skips it)")]
    Setup {
        step: &'static str,
        source: nix::Error,
    },
}

/// The signals the VM's own signal thread ends it for, forwarded by the supervisor.
fn forwarded() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

/// Move the VMM into a PID namespace of its own. Call it before any thread exists. Returns
/// in the child, PID 1 of the new namespace, with SIGTERM, SIGINT and SIGHUP blocked (the
/// VM's signal thread waits for them; blocked, they are kept for it even though PID 1 has no
/// handler). Never returns in the parent: it supervises the child and exits as it does.
pub fn enter(mode: SeccompMode) -> Result<(), PidNsError> {
    let err = |step| move |source| PidNsError::Setup { step, source };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID).map_err(err("unshare"))?;
    // Blocked before the fork, so that no signal sent in between is lost by either side.
    let mut waited = forwarded();
    waited.add(Signal::SIGCHLD);
    waited.thread_block().map_err(err("blocking signals"))?;
    // The child learns that the parent is gone by the pipe's end closing: getppid() says 0
    // in a new namespace whoever the parent is.
    let (alive_read, alive_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(err("pipe"))?;
    // SAFETY: no other thread exists yet (main calls this first), so the child may run any
    // code, not only async-signal-safe calls.
    match unsafe { fork() }.map_err(err("fork"))? {
        ForkResult::Child => {
            drop(alive_write);
            // SAFETY: prctl with PR_SET_PDEATHSIG takes a plain signal number.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(err("PR_SET_PDEATHSIG")(nix::Error::last()));
            }
            // If the parent died before prctl, nobody would kill us: its pipe end is closed.
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&alive_read),
                nix::poll::PollFlags::POLLIN,
            )];
            let gone =
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_err(err("poll"))? > 0;
            if gone {
                std::process::exit(128 + libc::SIGKILL);
            }
            drop(alive_read);
            let mut chld = SigSet::empty();
            chld.add(Signal::SIGCHLD);
            nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&chld), None)
                .map_err(err("unblocking SIGCHLD"))?;
            Ok(())
        }
        ForkResult::Parent { child } => {
            drop(alive_read);
            supervise(child, waited, mode, alive_write)
        }
    }
}

/// The parent's whole life: no capabilities, a tight filter, forward and wait.
fn supervise(child: Pid, waited: SigSet, mode: SeccompMode, _alive: std::os::fd::OwnedFd) -> ! {
    // Failing these leaves the supervisor with more than it needs, never the VM: say so.
    if let Err(e) = crate::privileges::drop_unneeded(false) {
        tracing::warn!("the VMM's supervisor keeps its capabilities: {e}");
    }
    // The program lives as long as the supervisor (this function never returns): freed
    // after install, it could cost a munmap (musl gives memory back that way), which the
    // filter rightly does not allow. Nothing below allocates.
    let program = match mode {
        SeccompMode::Off => None,
        _ => match seccomp::program(ThreadKind::Supervisor, mode) {
            Ok(program) => Some(program),
            Err(e) => {
                tracing::warn!("the VMM's supervisor runs unfiltered: {e}");
                None
            }
        },
    };
    if let Some(program) = &program {
        if let Err(e) = seccomp::install(ThreadKind::Supervisor, program) {
            tracing::warn!("the VMM's supervisor runs unfiltered: {e}");
        }
    }
    loop {
        let Ok(sig) = waited.wait() else { continue };
        if sig != Signal::SIGCHLD {
            let _ = nix::sys::signal::kill(child, sig);
            continue;
        }
        match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => die_by(sig),
            Ok(_) => {}
            Err(_) => exit(EXIT_LOST_CHILD),
        }
    }
}

/// Exit status if the child cannot be waited for (it should not happen).
const EXIT_LOST_CHILD: i32 = 1;

fn exit(code: i32) -> ! {
    // SAFETY: _exit takes a plain status and never returns; nothing is left to flush.
    unsafe { libc::_exit(code) }
}

/// End as the child did: killed by `sig`, so the runtime reads the same wait status.
fn die_by(sig: Signal) -> ! {
    // No core file of the supervisor: it is not the one that crashed.
    // SAFETY: prctl with PR_SET_DUMPABLE takes a plain flag.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    // SAFETY: the default disposition installs no handler code.
    let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    let mut set = SigSet::empty();
    set.add(sig);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), sig);
    exit(128 + sig as i32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::WaitStatus;

    /// In a forked child: enter the namespace, run `vm` as the VMM would (in the grandchild,
    /// PID 1), and report how the supervisor (the child) ended.
    fn supervised(vm: impl FnOnce() -> i32, after_fork: impl FnOnce(Pid)) -> WaitStatus {
        // SAFETY: the child only enters the namespace and leaves with _exit.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                let code = match enter(SeccompMode::Enforce) {
                    Ok(()) if nix::unistd::getpid().as_raw() == 1 => vm(),
                    Ok(()) => 3,
                    Err(_) => 4,
                };
                exit(code)
            }
            ForkResult::Parent { child } => {
                after_fork(child);
                waitpid(child, None).unwrap()
            }
        }
    }

    #[test]
    fn the_vm_runs_as_pid_1_and_its_status_is_the_supervisors() {
        let status = supervised(|| 42, |_| {});
        assert_eq!(status, WaitStatus::Exited(status.pid().unwrap(), 42));
    }

    #[test]
    fn sigterm_to_the_supervisor_reaches_the_vm() {
        // The VM waits for SIGTERM (blocked for it, as the VM's signal thread does) and
        // exits 143; without forwarding it would wait forever (the test would hang).
        let status = supervised(
            || match forwarded().wait() {
                Ok(Signal::SIGTERM) => 143,
                _ => 5,
            },
            |supervisor| {
                std::thread::sleep(std::time::Duration::from_millis(200));
                nix::sys::signal::kill(supervisor, Signal::SIGTERM).unwrap();
            },
        );
        assert_eq!(status, WaitStatus::Exited(status.pid().unwrap(), 143));
    }

    #[test]
    fn a_vm_killed_by_a_signal_kills_the_supervisor_by_the_same() {
        // As the kernel's OOM killer would: SIGKILL from outside, to the VM itself (PID 1 of
        // its namespace ignores one it sends itself).
        let status = supervised(
            || loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            },
            |supervisor| {
                let children = format!("/proc/{supervisor}/task/{supervisor}/children");
                let vm = (0..500)
                    .find_map(|_| {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        let text = std::fs::read_to_string(&children).ok()?;
                        text.split_whitespace().next()?.parse::<i32>().ok()
                    })
                    .expect("the supervisor started no VM");
                nix::sys::signal::kill(Pid::from_raw(vm), Signal::SIGKILL).unwrap();
            },
        );
        assert_eq!(
            status,
            WaitStatus::Signaled(status.pid().unwrap(), Signal::SIGKILL, false)
        );
    }

    #[test]
    fn killing_the_supervisor_kills_the_vm() {
        // The VM reports its own PID namespace's PID 1 to the test through a pipe's end:
        // when the VM dies, the pipe's write end closes and the read returns 0.
        let (read, write) = nix::unistd::pipe().unwrap();
        let status = supervised(
            move || {
                let _keep = &write;
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            },
            |supervisor| {
                std::thread::sleep(std::time::Duration::from_millis(200));
                nix::sys::signal::kill(supervisor, Signal::SIGKILL).unwrap();
            },
        );
        assert!(matches!(
            status,
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
        ));
        // Every write end is closed once the VM is dead: ours went with the closure, the
        // supervisor's with it.
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&read),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        let hup = fds[0].revents().unwrap_or(nix::poll::PollFlags::empty());
        assert!(
            hup.contains(nix::poll::PollFlags::POLLHUP),
            "the VM outlived its supervisor"
        );
    }
}

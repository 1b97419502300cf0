//! Child reaping for PID 1.
//!
//! Every orphan in the guest becomes our child, so a dedicated thread waits for `SIGCHLD` and
//! reaps every exited child with `waitpid(-1, WNOHANG)`. Children whose exit status is wanted
//! (container processes, later) are registered with [`Reaper::spawn_watched`]: their status is
//! sent to the registered channel; every other child is reaped and discarded.
//!
//! `SIGCHLD` must be blocked in every thread ([`block_sigchld`] before any thread starts) so
//! that only the reaper's `sigwait` consumes it. `std::process::Command` resets the signal mask
//! in the child, so spawned programs start with a clean mask. Never call `Child::wait` on a
//! process spawned here: the reaper may have collected it already; use the channel.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Blocks `SIGCHLD` in the calling thread; threads started afterwards inherit the mask.
pub fn block_sigchld() -> nix::Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
}

/// Collects exited children and hands the statuses of registered ones to their owners.
#[derive(Default)]
pub struct Reaper {
    watched: Mutex<HashMap<Pid, Sender<WaitStatus>>>,
}

impl Reaper {
    /// Starts the reaper thread. [`block_sigchld`] must have been called first.
    pub fn start() -> anyhow::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let worker = Arc::clone(&reaper);
        thread::Builder::new()
            .name("child-reaper".into())
            .spawn(move || worker.run())
            .context("cannot start the reaper thread")?;
        Ok(reaper)
    }

    fn run(&self) {
        let mut set = SigSet::empty();
        set.add(Signal::SIGCHLD);
        loop {
            // Children that exited before we started waiting left SIGCHLD pending: not lost.
            if let Err(err) = set.wait() {
                crate::warn!("sigwait(SIGCHLD) failed: {err}");
                thread::sleep(std::time::Duration::from_millis(100));
            }
            self.reap_exited();
        }
    }

    /// Reaps every child that has exited so far.
    pub fn reap_exited(&self) {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(status) => self.deliver(status),
                Err(Errno::EINTR) => continue,
                Err(err) => {
                    crate::warn!("waitpid failed: {err}");
                    return;
                }
            }
        }
    }

    fn deliver(&self, status: WaitStatus) {
        let Some(pid) = status.pid() else {
            return;
        };
        let is_final = matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..));
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = if is_final {
            watched.remove(&pid)
        } else {
            watched.get(&pid).cloned()
        };
        drop(watched);
        match sender {
            // The owner may have gone away; then nobody wants the status.
            Some(sender) => drop(sender.send(status)),
            None => crate::debug!("reaped unwatched process {pid}: {status:?}"),
        }
    }

    /// Runs `spawn` (which must start exactly one child and return its pid) and registers the
    /// child so its exit status reaches the returned receiver. The registry stays locked while
    /// `spawn` runs, so the child cannot be reaped and discarded before it is registered.
    #[allow(dead_code)] // For container processes (next milestone); covered by tests now.
    pub fn spawn_watched<E>(
        &self,
        spawn: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, Receiver<WaitStatus>), E> {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let pid = spawn()?;
        let (sender, receiver) = mpsc::channel();
        watched.insert(pid, sender);
        Ok((pid, receiver))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    #[test]
    fn watched_child_status_is_delivered() {
        let _children = crate::CHILDREN_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // No reaper thread here (tests run threads with SIGCHLD unblocked); drive it by hand.
        let reaper = Reaper::default();
        let (pid, statuses) = reaper
            .spawn_watched(|| {
                Command::new("sh")
                    .args(["-c", "exit 7"])
                    .spawn()
                    .map(|child| Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32")))
            })
            .expect("spawn sh");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            reaper.reap_exited();
            if let Ok(status) = statuses.try_recv() {
                assert_eq!(status, WaitStatus::Exited(pid, 7));
                break;
            }
            assert!(std::time::Instant::now() < deadline, "child never reaped");
            thread::sleep(Duration::from_millis(10));
        }
        assert!(reaper.watched.lock().unwrap().is_empty());
    }
}

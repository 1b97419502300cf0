//! Per-thread seccomp filters: once the VM runs, each thread of `brig-vmm` may make only the
//! system calls its job needs, so a guest that finds a bug in a device model gains little.
//!
//! The lists are syscall numbers only (no argument filters) and cover what the Rust standard
//! library, musl's allocator and the crates each thread uses ask of the kernel. Anything else
//! raises SIGSYS: the handler names the call and the thread on stderr and ends the VMM with
//! status 159 (128 + SIGSYS), as if the signal had killed it.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What a thread does, and so which system calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN, port and MMIO exits, the serial console.
    Vcpu,
    /// The vsock device's queues and its Unix-socket backend.
    Vsock,
    /// The virtio-fs device's queues and its passthrough file server.
    Fs,
    /// The virtio-net device's queues and its TAP.
    Net,
    /// Waits for SIGTERM/SIGINT/SIGHUP.
    Signals,
    /// The thread that started the others: waits for the end, cleans up, exits.
    Main,
}

/// How filters treat a system call that is not on the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// Stop the VMM (SIGSYS, status 159) and say which call it was.
    Enforce,
    /// Allow it but have the kernel log it (audit type 1326): for finding what a new code
    /// path needs.
    Log,
    /// No filters.
    Off,
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter for the {kind:?} thread: {reason}")]
    Build { kind: ThreadKind, reason: String },
    #[error("installing the seccomp filter for the {kind:?} thread: {reason}")]
    Install { kind: ThreadKind, reason: String },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(nix::Error),
}

/// What every thread needs: memory (musl's malloc), locks, its own exit, signal returns,
/// time, and writing diagnostics to stderr (the capped VMM log).
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_lseek,
    // The capped files (console_file.rs, vmm_log.rs): the VMM's log is written from every
    // thread, and when a capped file reaches its cap the newest half is read back, moved to
    // the front and the file cut. With write and lseek allowed, the positioned calls add
    // nothing; ftruncate only shortens files the VMM already holds open.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
];

/// vCPUs: KVM_RUN and friends, eventfd writes (interrupts), and device activation, which
/// runs on the vCPU that wrote DRIVER_OK: the virtio-fs server then opens the shared
/// directory (and /proc/self/fd) and clears the umask.
const VCPU: &[libc::c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_umask,
];

/// A device's event loop.
const EVENT_LOOP: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// The vsock device: accept host connections, connect guest connections to <uds>_<port>,
/// time out silent peers. No file system calls.
const VSOCK: &[libc::c_long] = &[
    // FIONBIO: accepted and connected sockets are made non-blocking.
    libc::SYS_ioctl,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_eventfd2,
    // vsock: timeouts for silent peers.
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// The virtio-fs passthrough server: everything a FUSE request can turn into, done on files
/// of the shared directory on the guest's behalf (with the guest's credentials per request).
/// No sockets.
const FS: &[libc::c_long] = &[
    libc::SYS_ioctl,
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_utimensat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_copy_file_range,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_umask,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_capget,
    libc::SYS_capset,
];

/// The virtio-net device: frames to and from its (already open, non-blocking) TAP, and its
/// eventfds.
const NET: &[libc::c_long] = &[
    // TUNSETOFFLOAD: the TAP's offloads follow each new driver's features.
    libc::SYS_ioctl,
    // One frame per read from the TAP; queue notifications and wakeups (eventfds).
    libc::SYS_read,
    // One frame per writev to the TAP, gathered from the guest's TX descriptors.
    libc::SYS_writev,
    // Interrupts (irqfd) and self-wakeups (eventfds).
    libc::SYS_write,
];

/// The signal thread only waits for one.
const SIGNALS: &[libc::c_long] = &[libc::SYS_rt_sigtimedwait];

/// The main thread removes the vsock socket before it exits.
const MAIN: &[libc::c_long] = &[libc::SYS_unlink, libc::SYS_unlinkat];

fn allowed(kind: ThreadKind) -> impl Iterator<Item = libc::c_long> {
    let (own, event_loop): (&[libc::c_long], bool) = match kind {
        ThreadKind::Vcpu => (VCPU, false),
        ThreadKind::Vsock => (VSOCK, true),
        ThreadKind::Fs => (FS, true),
        ThreadKind::Net => (NET, true),
        ThreadKind::Signals => (SIGNALS, false),
        ThreadKind::Main => (MAIN, false),
    };
    let event_loop: &[libc::c_long] = if event_loop { EVENT_LOOP } else { &[] };
    COMMON.iter().chain(own).chain(event_loop).copied()
}

/// The BPF program for a thread of `kind` (Enforce or Log mode).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        allowed(kind).map(|nr| (nr, Vec::new())).collect();
    let build = |reason: String| SeccompError::Build { kind, reason };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.to_string()))
}

thread_local! {
    /// The calling thread's kind, for the SIGSYS handler's message.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Install the filter for `kind` on the calling thread (nothing in Off mode).
pub fn apply(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    install(kind, &program(kind, mode)?)
}

/// Install an already built program for `kind` on the calling thread. Does not allocate.
pub fn install(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    KIND.with(|k| k.set(Some(kind)));
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
        kind,
        reason: e.to_string(),
    })
}

/// Catch SIGSYS (a filtered call in Enforce mode) to say which call it was before exiting.
/// Call once, before any filter is installed.
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::SigAction(on_sigsys),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: `on_sigsys` only makes async-signal-safe calls (write, _exit) on stack data.
    unsafe { sigaction(Signal::SIGSYS, &action) }.map_err(SeccompError::Handler)?;
    Ok(())
}

/// The exit status after a filtered call: what a kill by SIGSYS would give.
pub const EXIT_SECCOMP: i32 = 128 + libc::SIGSYS;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Linux's siginfo for SIGSYS: after signo, errno, code and padding (16 bytes) come the
    // faulting call's address (8 bytes), then the syscall number (int).
    // SAFETY: the kernel hands a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS raised by
    // seccomp the syscall number lives at this offset inside it.
    let nr = unsafe {
        (info as *const u8)
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let kind = KIND.with(|k| k.get());
    let mut buf = [0u8; 128];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"brig-vmm: seccomp: the ");
    put(match kind {
        Some(ThreadKind::Vcpu) => b"vCPU",
        Some(ThreadKind::Vsock) => b"vsock",
        Some(ThreadKind::Fs) => b"virtio-fs",
        Some(ThreadKind::Net) => b"virtio-net",
        Some(ThreadKind::Signals) => b"signal",
        Some(ThreadKind::Main) => b"main",
        None => b"unknown",
    });
    put(b" thread made system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b", which its filter does not allow (brig-vmm --seccomp log finds what a path needs)\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf` outlives the call.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_kind_gets_a_program() {
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::Vsock,
            ThreadKind::Fs,
            ThreadKind::Net,
            ThreadKind::Signals,
            ThreadKind::Main,
        ] {
            let prog = program(kind, SeccompMode::Enforce).unwrap();
            assert!(
                prog.len() > allowed(kind).count(),
                "{kind:?}: {} instructions",
                prog.len()
            );
        }
    }

    /// Exit status of a forked child that installs `kind`'s filter and then runs `body`.
    /// The program is built before the fork: the child of a threaded process must not
    /// allocate, and `body` only makes raw system calls.
    fn exit_code_under_filter(kind: ThreadKind, body: fn() -> i32) -> Option<i32> {
        let prog = program(kind, SeccompMode::Enforce).unwrap();
        // SAFETY: the child installs the handler and filter, runs `body`, and leaves with
        // _exit without touching the parent's state.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match (install_sigsys_handler(), install(kind, &prog)) {
                    (Ok(()), Ok(())) => body(),
                    _ => 1,
                };
                // SAFETY: leaving the forked child at once.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                match nix::sys::wait::waitpid(child, None).unwrap() {
                    nix::sys::wait::WaitStatus::Exited(_, code) => Some(code),
                    _ => None,
                }
            }
        }
    }

    #[test]
    fn a_filtered_call_ends_the_process_with_159() {
        // getppid is on no list: the child never gets to return 0.
        let code = exit_code_under_filter(ThreadKind::Vcpu, || {
            // SAFETY: a plain system call with no pointers.
            unsafe { libc::syscall(libc::SYS_getppid) };
            0
        });
        assert_eq!(code, Some(EXIT_SECCOMP));
    }

    #[test]
    fn an_allowed_call_still_works_under_the_filter() {
        let code = exit_code_under_filter(ThreadKind::Signals, || {
            // SAFETY: gettid has no arguments.
            unsafe { libc::syscall(libc::SYS_gettid) };
            7
        });
        assert_eq!(code, Some(7));
    }

    #[test]
    fn the_net_thread_may_move_frames() {
        // A frame's writev and read (here on bad descriptors: EBADF, but allowed).
        let code = exit_code_under_filter(ThreadKind::Net, || {
            // SAFETY: no memory is passed (zero iovecs, zero-length read).
            unsafe {
                libc::syscall(libc::SYS_writev, -1, std::ptr::null::<libc::iovec>(), 0);
                libc::syscall(libc::SYS_read, -1, std::ptr::null_mut::<u8>(), 0);
            }
            7
        });
        assert_eq!(code, Some(7));
    }
}

//! Per-thread seccomp filters: once the VM runs, each thread of `brig-vmm` may make only the
//! system calls its job needs, so a guest that finds a bug in a device model gains little.
//!
//! The rules are data, in the manner of Firecracker's filters: per thread kind, a few tables of
//! rules, each a system call, the argument checks it must pass (none: any arguments) and who
//! needs it. `ioctl` is allowed only for the requests a thread makes (the vCPU's `KVM_RUN`, the
//! vsock backend's `FIONBIO`, the net device's `TUNSETOFFLOAD`), `socket` only for the vsock
//! backend's Unix streams. The tables
//! cover what the Rust standard library, musl's allocator and the crates each thread uses ask
//! of the kernel. Anything else raises SIGSYS: the handler names the call and the thread on
//! stderr and ends the VMM with status 159 (128 + SIGSYS), as if the signal had killed it.
//!
//! A new thread kind is its [`ThreadKind`] variant, one more table, and the line in `tables`
//! that names the tables it is made of (plus its filter in `vm.rs` and its name in the SIGSYS
//! message).

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

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
    /// The balloon's queues: free page reports become madvise(MADV_DONTNEED) (in COMMON).
    Balloon,
    /// Waits for SIGTERM/SIGINT/SIGHUP.
    Signals,
    /// The thread that started the others: waits for the end, cleans up, exits.
    Main,
    /// The process outside the VMM's PID namespace (pid_ns.rs): forwards signals, waits.
    Supervisor,
}

impl ThreadKind {
    /// What the thread is called: its name in the process, and in a refused call's message.
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Fs => "virtio-fs",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Balloon => "virtio-balloon",
            ThreadKind::Signals => "signal",
            ThreadKind::Main => "main",
            ThreadKind::Supervisor => "supervisor",
        }
    }
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

/// One allowed system call.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// The system call's number.
    nr: libc::c_long,
    /// The argument checks: the call is allowed when every check of one of these alternatives
    /// holds. None: any arguments.
    only: &'static [&'static [Check]],
    /// Who makes it, and why.
    why: &'static str,
}

/// A check on one argument of a system call.
#[derive(Debug, Clone)]
struct Check {
    arg: u8,
    op: SeccompCmpOp,
    value: u32,
}

impl Check {
    /// The BPF condition. Every argument checked here is an `int` or `unsigned int` in the
    /// kernel (ioctl's request, socket's domain and type), which uses its low 32 bits only:
    /// so are they compared (as Firecracker does), whatever a C library's wrapper left in the
    /// upper half (musl passes the ioctl request as a sign-extended `int`).
    fn condition(&self) -> Result<SeccompCondition, seccompiler::BackendError> {
        SeccompCondition::new(
            self.arg,
            SeccompCmpArgLen::Dword,
            self.op.clone(),
            u64::from(self.value),
        )
    }
}

/// Any arguments.
const ANY: &[&[Check]] = &[];

/// `ioctl(fd, request, ...)` with this request.
const fn request(request: u32) -> Check {
    Check {
        arg: 1,
        op: SeccompCmpOp::Eq,
        value: request,
    }
}

/// `_IO(KVMIO, 0x80)`: run the vCPU until it exits to us.
const KVM_RUN: u32 = 0xae80;
/// Make a file descriptor (non-)blocking.
const FIONBIO: u32 = 0x5421;
/// `_IOW('T', 208, int)`: the offloads a TAP device may hand us.
const TUNSETOFFLOAD: u32 = 0x4004_54d0;

/// The flags a socket type may carry besides the type itself.
const SOCK_FLAGS: u32 = (libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK).unsigned_abs();

/// `socket(AF_UNIX, SOCK_STREAM [| SOCK_CLOEXEC | SOCK_NONBLOCK], 0)`.
const UNIX_STREAM: &[Check] = &[
    Check {
        arg: 0,
        op: SeccompCmpOp::Eq,
        value: libc::AF_UNIX.unsigned_abs(),
    },
    Check {
        arg: 1,
        op: SeccompCmpOp::MaskedEq(!SOCK_FLAGS as u64),
        value: libc::SOCK_STREAM.unsigned_abs(),
    },
    Check {
        arg: 2,
        op: SeccompCmpOp::Eq,
        value: 0,
    },
];

/// A rule for a call with any arguments.
const fn any(nr: libc::c_long, why: &'static str) -> Rule {
    Rule { nr, only: ANY, why }
}

// The tables keep one call per line (rustfmt would fold them): they read as data. "Kept"
// marks a call no trace or code reading has shown on that thread, allowed because nothing
// shows it is never made either.

/// What every thread needs: memory (musl's malloc), locks, its own exit, signal returns,
/// time, and writing diagnostics to stderr (the capped VMM log).
#[rustfmt::skip]
const COMMON: &[Rule] = &[
    any(libc::SYS_read, "eventfds, sockets, files: every thread reads something"),
    any(libc::SYS_write, "stderr (the VMM log), eventfds (wakeups, interrupts)"),
    any(libc::SYS_readv, "kept: the standard library's vectored reads"),
    any(libc::SYS_writev, "the standard library's vectored writes (log lines)"),
    any(libc::SYS_close, "dropping any file descriptor"),
    any(libc::SYS_futex, "locks, channels, thread parking"),
    any(libc::SYS_mmap, "musl's malloc"),
    any(libc::SYS_munmap, "musl's malloc, thread exit"),
    any(libc::SYS_mremap, "musl's realloc"),
    any(libc::SYS_madvise, "musl's malloc gives memory back, thread exit"),
    any(libc::SYS_brk, "musl's malloc"),
    any(libc::SYS_rt_sigreturn, "kept: returning from a signal handler (SIGSYS's never returns)"),
    any(libc::SYS_rt_sigprocmask, "musl's thread exit blocks signals"),
    any(libc::SYS_sigaltstack, "the standard library's thread exit drops its signal stack"),
    any(libc::SYS_exit, "a thread's end"),
    any(libc::SYS_exit_group, "the VMM's end"),
    any(libc::SYS_clock_gettime, "log timestamps, vsock deadlines, warning rate limits"),
    any(libc::SYS_clock_nanosleep, "kept: thread::sleep"),
    any(libc::SYS_nanosleep, "kept: thread::sleep"),
    any(libc::SYS_sched_yield, "kept: musl's and the standard library's spin loops"),
    any(libc::SYS_getpid, "kept: musl internals"),
    any(libc::SYS_gettid, "kept: musl internals"),
    any(libc::SYS_getrandom, "a thread's first HashMap seeds its keys"),
    any(libc::SYS_fcntl, "descriptor flags (socket2's O_NONBLOCK, CLOEXEC)"),
    any(libc::SYS_fstat, "the standard library's metadata of open files"),
    // The capped files (console_file.rs, vmm_log.rs): the VMM's log is written from every
    // thread, and when a capped file reaches its cap the newest half is read back, moved to
    // the front and the file cut. With write and lseek allowed, the positioned calls add
    // nothing; ftruncate only shortens files the VMM already holds open.
    any(libc::SYS_lseek, "the capped files: where the next write goes"),
    any(libc::SYS_pread64, "the capped files: reading back the newest half"),
    any(libc::SYS_pwrite64, "the capped files: writing at their own offset"),
    any(libc::SYS_ftruncate, "the capped files: cutting after the move"),
];

/// vCPUs: KVM_RUN, eventfd writes (interrupts, queue kicks that missed the ioeventfd) and
/// the serial console's output. Device activation and reset run here too (on the vCPU that
/// writes the status register), so they only flip state and wake the device's own thread:
/// the virtio-fs server is rebuilt there. No file opening, no sockets.
#[rustfmt::skip]
const VCPU: &[Rule] = &[
    // `VcpuFd::run` (kvm-ioctls) makes only this one: MMIO and port exits are read from the
    // mapped `kvm_run` page, and interrupts go through irqfds (eventfd writes). Every other
    // KVM ioctl (vCPU setup, irqfds, ioeventfds) is made before the filters.
    Rule { nr: libc::SYS_ioctl, only: &[&[request(KVM_RUN)]], why: "run_vcpu: KVM_RUN" },
];

/// A device's event loop (event-manager).
#[rustfmt::skip]
const EVENT_LOOP: &[Rule] = &[
    any(libc::SYS_epoll_wait, "EventManager::run"),
    any(libc::SYS_epoll_pwait, "EventManager::run (musl's epoll_wait)"),
    any(libc::SYS_epoll_ctl, "devices add and remove their descriptors"),
];

/// The vsock device: accept host connections, connect guest connections to <uds>_<port>,
/// time out silent peers. No file system calls. Its eventfds and timer are made with the
/// device, before any filter.
#[rustfmt::skip]
const VSOCK: &[Rule] = &[
    // The standard library's set_nonblocking (socket2's uses fcntl).
    Rule { nr: libc::SYS_ioctl, only: &[&[request(FIONBIO)]], why: "backend: accepted streams" },
    any(libc::SYS_accept4, "backend: host processes connecting to the vsock socket"),
    // socket2's Socket::new(Domain::UNIX, Type::STREAM, None), with SOCK_CLOEXEC.
    Rule { nr: libc::SYS_socket, only: &[UNIX_STREAM], why: "backend: guest to <uds>_<port>" },
    any(libc::SYS_connect, "backend: the guest connection's Unix socket"),
    any(libc::SYS_recvfrom, "connections, handshakes: reading host streams (std's recv)"),
    any(libc::SYS_sendto, "kept: a plain write of a host stream (the backend uses sendmsg)"),
    any(libc::SYS_recvmsg, "kept: vectored reads of host streams"),
    any(libc::SYS_sendmsg, "connections: writes to host streams (socket2, MSG_NOSIGNAL)"),
    any(libc::SYS_shutdown, "connections: the guest's half-close reaches the host stream"),
    any(libc::SYS_getsockopt, "kept: SO_ERROR of a connect in progress"),
    any(libc::SYS_timerfd_settime, "timeouts for silent peers: arming and stopping the tick"),
];

/// The virtio-fs passthrough server: everything a FUSE request can turn into, done on files
/// of the shared directory on the guest's behalf (with the guest's credentials per request),
/// and rebuilding the server after a device reset. No sockets, no ioctl: the passthrough
/// file system answers FUSE_IOCTL with ENOSYS without making one.
#[rustfmt::skip]
const FS: &[Rule] = &[
    any(libc::SYS_openat, "lookup, open, create; a rebuilt server opens its root"),
    any(libc::SYS_open, "musl's File::open: a rebuilt server reads /proc/self/mountinfo"),
    any(libc::SYS_newfstatat, "getattr, lookup"),
    any(libc::SYS_statx, "getattr, lookup (the standard library's metadata)"),
    any(libc::SYS_getdents64, "readdir"),
    any(libc::SYS_readlinkat, "readlink"),
    any(libc::SYS_mkdirat, "mkdir"),
    any(libc::SYS_mknodat, "mknod"),
    any(libc::SYS_unlinkat, "unlink, rmdir"),
    any(libc::SYS_renameat, "rename"),
    any(libc::SYS_renameat2, "rename with flags"),
    any(libc::SYS_linkat, "link"),
    any(libc::SYS_symlinkat, "symlink"),
    any(libc::SYS_fchmod, "setattr (mode)"),
    any(libc::SYS_fchmodat, "setattr (mode)"),
    any(libc::SYS_fchown, "setattr (owner)"),
    any(libc::SYS_fchownat, "setattr (owner)"),
    any(libc::SYS_utimensat, "setattr (times)"),
    any(libc::SYS_ftruncate, "setattr (size)"),
    any(libc::SYS_fallocate, "fallocate"),
    any(libc::SYS_fsync, "fsync, fsyncdir"),
    any(libc::SYS_fdatasync, "fsync with datasync"),
    any(libc::SYS_pread64, "read"),
    any(libc::SYS_pwrite64, "write"),
    any(libc::SYS_preadv, "read into several guest buffers"),
    any(libc::SYS_pwritev, "write from several guest buffers"),
    any(libc::SYS_preadv2, "read into several guest buffers"),
    any(libc::SYS_pwritev2, "write from several guest buffers"),
    any(libc::SYS_copy_file_range, "copy_file_range"),
    any(libc::SYS_statfs, "statfs"),
    any(libc::SYS_fstatfs, "statfs"),
    any(libc::SYS_flock, "flock-style locks"),
    any(libc::SYS_dup, "open of an inode's O_PATH descriptor"),
    any(libc::SYS_dup3, "open of an inode's O_PATH descriptor"),
    any(libc::SYS_umask, "create with the guest's umask; a rebuilt server clears it"),
    any(libc::SYS_setresuid, "each request runs with the guest caller's uid"),
    any(libc::SYS_setresgid, "each request runs with the guest caller's gid"),
    any(libc::SYS_setgroups, "the caller's supplementary groups"),
    any(libc::SYS_capget, "dropping CAP_FSETID for a write by a non-owner"),
    any(libc::SYS_capset, "dropping CAP_FSETID for a write by a non-owner"),
];

/// The virtio-net device's event loop: frames between the TAP and the queues. The TAP's
/// frames (one read or writev each) and the eventfds' reads and writes are in [`COMMON`],
/// the epoll calls in [`EVENT_LOOP`]. The TAP is opened, its header size set
/// (TUNSETVNETHDRSZ) and the eventfds made with the device, before any filter.
#[rustfmt::skip]
const NET: &[Rule] = &[
    Rule {
        nr: libc::SYS_ioctl,
        only: &[&[request(TUNSETOFFLOAD)]],
        why: "Net::apply_offloads: the TAP's offloads follow each new driver's features",
    },
];

/// The signal thread only waits for one.
#[rustfmt::skip]
const SIGNALS: &[Rule] = &[any(libc::SYS_rt_sigtimedwait, "SigSet::wait")];

/// The main thread removes the vsock socket before it exits.
#[rustfmt::skip]
const MAIN: &[Rule] = &[
    any(libc::SYS_unlink, "Vsock's drop removes its socket (std's remove_file)"),
    any(libc::SYS_unlinkat, "kept: remove_file on a C library that uses unlinkat"),
];

/// The supervisor outside the PID namespace: nothing of [`COMMON`], only what forwarding
/// signals and ending as the VMM ended take.
#[rustfmt::skip]
const SUPERVISOR: &[Rule] = &[
    any(libc::SYS_rt_sigtimedwait, "SigSet::wait for a signal to forward or SIGCHLD"),
    any(libc::SYS_kill, "forwarding SIGTERM, SIGINT, SIGHUP to the VMM; dying by its signal"),
    any(libc::SYS_getpid, "dying by the VMM's signal: kill(getpid())"),
    any(libc::SYS_wait4, "waitpid for the VMM's end"),
    any(libc::SYS_prctl, "no core file when dying by the VMM's signal"),
    any(libc::SYS_rt_sigaction, "the default action for that signal"),
    any(libc::SYS_rt_sigprocmask, "unblocking it"),
    any(libc::SYS_exit_group, "ending with the VMM's status"),
];

/// The tables a thread of `kind` may make calls from.
fn tables(kind: ThreadKind) -> &'static [&'static [Rule]] {
    match kind {
        ThreadKind::Vcpu => &[COMMON, VCPU],
        ThreadKind::Vsock => &[COMMON, EVENT_LOOP, VSOCK],
        ThreadKind::Fs => &[COMMON, EVENT_LOOP, FS],
        ThreadKind::Net => &[COMMON, EVENT_LOOP, NET],
        ThreadKind::Balloon => &[COMMON, EVENT_LOOP],
        ThreadKind::Signals => &[COMMON, SIGNALS],
        ThreadKind::Main => &[COMMON, MAIN],
        ThreadKind::Supervisor => &[SUPERVISOR],
    }
}

/// The seccompiler rules of `tables`: per call, the alternatives of every table that names
/// it, or no conditions at all if one of them allows any arguments.
fn compile(tables: &[&[Rule]]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut any_args = std::collections::BTreeSet::new();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for rule in tables.iter().flat_map(|t| t.iter()) {
        let alternatives = rules.entry(rule.nr).or_default();
        if rule.only.is_empty() {
            any_args.insert(rule.nr);
        }
        for checks in rule.only {
            let alternative = checks
                .iter()
                .map(Check::condition)
                .collect::<Result<_, _>>()
                .and_then(SeccompRule::new)
                .map_err(|e| format!("system call {} ({}): {e}", rule.nr, rule.why))?;
            alternatives.push(alternative);
        }
    }
    for nr in any_args {
        rules.insert(nr, Vec::new());
    }
    Ok(rules)
}

/// The BPF program for a thread of `kind` (Enforce or Log mode).
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let build = |reason: String| SeccompError::Build { kind, reason };
    let rules = compile(tables(kind)).map_err(build)?;
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

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
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
    // The call's first two arguments, as the registers held them when it trapped (x86_64
    // passes them in rdi and rsi): what an ioctl or socket was refused for.
    // SAFETY: for SA_SIGINFO handlers the kernel's third argument is a valid ucontext_t,
    // whose general registers are those of the interrupted system call.
    let args = unsafe {
        let gregs = &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        [libc::REG_RDI, libc::REG_RSI].map(|r| {
            usize::try_from(r)
                .ok()
                .and_then(|r| gregs.get(r))
                .map_or(0, |v| v.cast_unsigned())
        })
    };
    let message = Message::refused(KIND.with(|k| k.get()), nr, args);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `message` outlives the call.
    unsafe {
        libc::write(2, message.buf.as_ptr().cast(), message.len);
        libc::_exit(EXIT_SECCOMP);
    }
}

/// The SIGSYS handler's message, built on the stack (a signal handler must not allocate).
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    /// What a thread of `kind` was refused: system call `nr`, with the first two arguments
    /// `args` named for the calls filtered by argument.
    fn refused(kind: Option<ThreadKind>, nr: libc::c_int, args: [u64; 2]) -> Message {
        let mut m = Message {
            buf: [0; 256],
            len: 0,
        };
        m.put(b"brig-vmm: seccomp: the ");
        m.put(kind.map_or("unknown", ThreadKind::name).as_bytes());
        m.put(b" thread made system call ");
        m.number(u64::from(nr.unsigned_abs()), 10);
        match libc::c_long::from(nr) {
            libc::SYS_ioctl => {
                m.put(b" (ioctl, request 0x");
                m.number(args[1] & 0xffff_ffff, 16);
                m.put(b")");
            }
            libc::SYS_socket => {
                m.put(b" (socket, domain ");
                m.number(args[0] & 0xffff_ffff, 10);
                m.put(b", type 0x");
                m.number(args[1] & 0xffff_ffff, 16);
                m.put(b")");
            }
            _ => {}
        }
        m.put(
            b", which its filter does not allow (brig-vmm --seccomp log finds what a path needs)\n",
        );
        m
    }

    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: u64, base: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            // base is 10 or 16: the digit is under 16.
            let digit = u8::try_from(v % base).unwrap_or(0);
            digits[i] = b"0123456789abcdef"[usize::from(digit & 0xf)];
            v /= base;
            if v == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }

    #[cfg(test)]
    fn text(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap()
    }
}

/// Exit status of a forked child that installs `kind`'s filter and then runs `body` (None
/// if a signal ended it). The program is built before the fork; `body` should keep to raw
/// system calls and the device code under test: the child of a threaded process must not
/// take locks another thread held at the fork.
#[cfg(test)]
pub(crate) fn exit_code_under_filter(kind: ThreadKind, body: impl FnOnce() -> i32) -> Option<i32> {
    let prog = program(kind, SeccompMode::Enforce).unwrap();
    // SAFETY: the child installs the handler and filter, runs `body`, and leaves with _exit
    // without touching the parent's state.
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
            ThreadKind::Balloon,
            ThreadKind::Signals,
            ThreadKind::Main,
            ThreadKind::Supervisor,
        ] {
            let prog = program(kind, SeccompMode::Enforce).unwrap();
            assert!(
                prog.len() > compile(tables(kind)).unwrap().len(),
                "{kind:?}: {} instructions",
                prog.len()
            );
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

    /// `ioctl(-1, request)` under `kind`'s filter: 0 if the kernel answered EBADF (the filter
    /// let the call through), another errno's number if it answered otherwise, 159 if the
    /// filter stopped it.
    fn ioctl_on_a_bad_fd(kind: ThreadKind, request: u64) -> Option<i32> {
        exit_code_under_filter(kind, move || {
            // SAFETY: the descriptor is invalid, so the kernel looks at nothing else. The
            // request goes in as the raw 64-bit register value, upper half included.
            let ret = unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) };
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EBADF) if ret == -1 => 0,
                Some(errno) => errno,
                None => 2,
            }
        })
    }

    /// `socket(domain, ty, 0)` under `kind`'s filter: 0 if it returned a descriptor, 1 if
    /// the kernel refused it, 159 if the filter stopped it.
    fn socket_under_filter(kind: ThreadKind, domain: i32, ty: i32) -> Option<i32> {
        exit_code_under_filter(kind, move || {
            // SAFETY: socket(2) takes no pointers.
            let fd = unsafe { libc::socket(domain, ty, 0) };
            i32::from(fd < 0)
        })
    }

    #[test]
    fn the_vcpu_may_run_kvm_and_no_other_ioctl() {
        let kvm_run = u64::from(KVM_RUN);
        assert_eq!(ioctl_on_a_bad_fd(ThreadKind::Vcpu, kvm_run), Some(0));
        // The kernel reads the request as an unsigned int; what a C library leaves in the
        // upper half (musl sign-extends an int) changes nothing, for it or for the filter.
        assert_eq!(
            ioctl_on_a_bad_fd(ThreadKind::Vcpu, 0xffff_ffff_0000_0000 | kvm_run),
            Some(0)
        );
        for other in [
            FIONBIO,
            TUNSETOFFLOAD,
            0x5401, /* TCGETS */
            0xae01, /* KVM_CREATE_VM */
        ] {
            assert_eq!(
                ioctl_on_a_bad_fd(ThreadKind::Vcpu, u64::from(other)),
                Some(EXIT_SECCOMP),
                "ioctl {other:#x} on the vCPU thread"
            );
        }
    }

    #[test]
    fn the_vsock_thread_may_set_fionbio_and_no_other_ioctl() {
        let fionbio = u64::from(FIONBIO);
        assert_eq!(ioctl_on_a_bad_fd(ThreadKind::Vsock, fionbio), Some(0));
        let kvm_run = u64::from(KVM_RUN);
        assert_eq!(
            ioctl_on_a_bad_fd(ThreadKind::Vsock, kvm_run),
            Some(EXIT_SECCOMP)
        );
    }

    #[test]
    fn the_fs_and_other_threads_make_no_ioctl() {
        for kind in [ThreadKind::Fs, ThreadKind::Signals, ThreadKind::Main] {
            for request in [FIONBIO, KVM_RUN] {
                assert_eq!(
                    ioctl_on_a_bad_fd(kind, u64::from(request)),
                    Some(EXIT_SECCOMP),
                    "{kind:?}: ioctl {request:#x}"
                );
            }
        }
    }

    #[test]
    fn the_vsock_thread_gets_unix_streams_and_no_other_socket() {
        use libc::{AF_INET, AF_INET6, AF_UNIX, AF_VSOCK, SOCK_CLOEXEC, SOCK_DGRAM};
        use libc::{SOCK_NONBLOCK, SOCK_STREAM};
        for ty in [
            SOCK_STREAM,
            SOCK_STREAM | SOCK_CLOEXEC,
            SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
        ] {
            assert_eq!(
                socket_under_filter(ThreadKind::Vsock, AF_UNIX, ty),
                Some(0),
                "AF_UNIX, type {ty:#x}"
            );
        }
        for (domain, ty) in [
            (AF_INET, SOCK_STREAM | SOCK_CLOEXEC),
            (AF_INET6, SOCK_STREAM),
            (AF_VSOCK, SOCK_STREAM),
            (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC),
        ] {
            assert_eq!(
                socket_under_filter(ThreadKind::Vsock, domain, ty),
                Some(EXIT_SECCOMP),
                "domain {domain}, type {ty:#x}"
            );
        }
        // No other thread opens sockets at all.
        for kind in [ThreadKind::Vcpu, ThreadKind::Fs] {
            assert_eq!(
                socket_under_filter(kind, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC),
                Some(EXIT_SECCOMP),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn no_file_is_opened_on_a_vcpu_thread() {
        let path = c"/proc/self/status";
        let code = exit_code_under_filter(ThreadKind::Vcpu, || {
            // SAFETY: `path` is a NUL-terminated string that outlives the call.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            i32::from(fd < 0)
        });
        assert_eq!(code, Some(EXIT_SECCOMP));
    }

    #[test]
    fn the_request_numbers_are_the_kernels() {
        use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE};
        assert_eq!(
            ioctl_expr(_IOC_NONE, 0xae, 0x80, 0),
            libc::c_ulong::from(KVM_RUN)
        );
        // libc's request type is an int on musl and an unsigned long on glibc.
        let low_bits = |request: libc::Ioctl| u32::try_from(i128::from(request) & 0xffff_ffff);
        assert_eq!(low_bits(libc::FIONBIO), Ok(FIONBIO));
        assert_eq!(low_bits(libc::TUNSETOFFLOAD), Ok(TUNSETOFFLOAD));
    }

    #[test]
    fn a_call_allowed_with_any_arguments_in_one_table_is_not_narrowed_by_another() {
        const NARROW: &[Rule] = &[Rule {
            nr: libc::SYS_ioctl,
            only: &[&[request(FIONBIO)]],
            why: "test",
        }];
        const WIDE: &[Rule] = &[any(libc::SYS_ioctl, "test")];
        let rules = compile(&[NARROW, WIDE]).unwrap();
        assert_eq!(rules.get(&libc::SYS_ioctl).map(Vec::len), Some(0));
        let rules = compile(&[NARROW, NARROW]).unwrap();
        assert_eq!(rules.get(&libc::SYS_ioctl).map(Vec::len), Some(2));
    }

    #[test]
    fn the_refusal_names_the_thread_the_call_and_what_it_was_refused_for() {
        let m = Message::refused(Some(ThreadKind::Vcpu), 16, [7, 0xffff_ffff_0000_5401]);
        assert!(
            m.text().starts_with(
                "brig-vmm: seccomp: the vCPU thread made system call 16 (ioctl, request 0x5401), \
                 which its filter does not allow"
            ),
            "{}",
            m.text()
        );
        let m = Message::refused(Some(ThreadKind::Vsock), 41, [2, 0x80001]);
        assert!(
            m.text()
                .contains("system call 41 (socket, domain 2, type 0x80001), which"),
            "{}",
            m.text()
        );
        let m = Message::refused(None, 110, [0, 0]);
        assert!(m
            .text()
            .contains("unknown thread made system call 110, which"));
        assert!(m.text().ends_with("needs)\n"), "{}", m.text());
    }

    #[test]
    fn the_net_thread_may_set_tunsetoffload_and_no_other_ioctl() {
        assert_eq!(
            ioctl_on_a_bad_fd(ThreadKind::Net, u64::from(TUNSETOFFLOAD)),
            Some(0)
        );
        for other in [
            KVM_RUN,
            FIONBIO,
            0x4004_54ca, /* TUNSETIFF */
            0x4004_54d8, /* TUNSETVNETHDRSZ: set before the filters */
        ] {
            assert_eq!(
                ioctl_on_a_bad_fd(ThreadKind::Net, u64::from(other)),
                Some(EXIT_SECCOMP),
                "ioctl {other:#x} on the net thread"
            );
        }
    }

    #[test]
    fn the_net_thread_may_move_frames_and_opens_no_socket() {
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
        assert_eq!(
            socket_under_filter(ThreadKind::Net, libc::AF_UNIX, libc::SOCK_STREAM),
            Some(EXIT_SECCOMP)
        );
    }
}

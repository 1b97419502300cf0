//! A hostile guest init for the e2e tests (issue 8): root in the guest, outside any container,
//! wins every race for the host's stdio ports.
//!
//! Booted as `rdinit=/guest-racer` from an initramfs that also holds the real agent at
//! `/init`: it forks the racer, then execs the agent, which stays PID 1. The racer traces the
//! agent's threads (ptrace) and stops each one as it enters `connect()` to a host vsock port;
//! before letting it go on, the racer connects to that same port itself and writes garbage
//! that would show up in a container's output if the host took its connection for the stream.
//! So the host always sees the racer's connection first. A line per race goes to the guest
//! console (`racer: port P: ...`), where the test reads them.

use std::ffi::CString;
use std::io::Write;
use std::time::{Duration, Instant};

/// The host's context ID.
const HOST_CID: u32 = 2;
/// Host ports below this are not stdio streams (the runtime's `STDIO_PORT_BASE`).
const STDIO_PORT_BASE: u32 = 0x1_0000;
/// What the racer writes first: as long as the runtime's stream token, and plainly not it.
const GARBAGE: &[u8] = b"RACER-WAS-HERE!!";

fn main() {
    // SAFETY: we are single-threaded here (PID 1 before anything started), so the child may
    // run any code after fork.
    match unsafe { libc::fork() } {
        0 => race(),
        _ => {
            // The parent becomes the real agent, keeping PID 1; a failed fork leaves only it.
            let init = CString::new("/init").unwrap();
            let argv = [init.as_ptr(), std::ptr::null()];
            // SAFETY: argv is a null-terminated array of valid C strings that outlive the call.
            unsafe { libc::execv(init.as_ptr(), argv.as_ptr()) };
            eprintln!(
                "guest-racer: exec /init: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

/// The guest console (the host's console.log), opened before the agent changes /dev.
static CONSOLE: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();

fn say(line: &str) {
    if let Some(mut console) = CONSOLE.get().and_then(Option::as_ref) {
        let _ = console.write_all(format!("racer: {line}\n").as_bytes());
    }
}

fn race() -> ! {
    let _ = CONSOLE.set(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/console")
            .ok(),
    );
    say("waiting for the agent");
    // The agent moves the guest onto a new root that we, forked before, do not see: a proc
    // of our own tells us about its threads.
    let proc = std::path::Path::new("/racer-proc");
    let _ = std::fs::create_dir(proc);
    let source = CString::new("proc").unwrap();
    let target = CString::new("/racer-proc").unwrap();
    // SAFETY: valid C strings; no mount data.
    if unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        say(&format!(
            "cannot mount proc: {}",
            std::io::Error::last_os_error()
        ));
        std::process::exit(1);
    }
    // Wait for the agent to be the agent (exec'd: its name is that of /init).
    let started = Instant::now();
    while std::fs::read_to_string(proc.join("1/comm")).map_or(true, |c| c.trim() != "init") {
        if started.elapsed() > Duration::from_secs(30) {
            say("the agent never started");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut traced = std::collections::HashSet::new();
    // Threads started while we attach are caught by PTRACE_O_TRACECLONE; look twice.
    for _ in 0..2 {
        for tid in threads_of(1) {
            if traced.insert(tid) {
                seize(tid);
            }
        }
    }
    say(&format!("tracing the agent's {} threads", traced.len()));
    let mut races = 0u64;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let tid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if tid < 0 {
            say(&format!("waitpid: {}", std::io::Error::last_os_error()));
            std::process::exit(1);
        }
        if !libc::WIFSTOPPED(status) {
            continue; // a traced thread ended
        }
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;

        let inject = if sig == libc::SIGTRAP | 0x80 {
            if let Some(port) = entering_connect_to_host(tid) {
                races += 1;
                let got = connect_first(port);
                say(&format!(
                    "port {port}: connected first ({got}); {races} races"
                ));
            }
            0
        } else if event != 0 || sig == libc::SIGTRAP || sig == libc::SIGSTOP {
            0 // clone events, our attach stop, new threads' first stop
        } else {
            sig // a real signal for the agent: deliver it
        };
        // SAFETY: tid is a stopped tracee of ours.
        unsafe { libc::ptrace(libc::PTRACE_SYSCALL, tid, 0, inject) };
    }
}

/// The threads of process `pid`.
fn threads_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/racer-proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Trace thread `tid`, stopping it at every system call and following the threads it starts.
fn seize(tid: i32) {
    let options = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_TRACECLONE;
    // SAFETY: plain ptrace requests on a thread ID; failures are reported below.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, options) != 0 {
            say(&format!(
                "cannot trace thread {tid}: {}",
                std::io::Error::last_os_error()
            ));
            return;
        }
        // Stop it once so that the wait loop starts it with PTRACE_SYSCALL.
        libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0);
    }
}

/// The host vsock port thread `tid` is about to connect to, if it is entering `connect()` to a
/// stdio port of the host.
fn entering_connect_to_host(tid: i32) -> Option<u32> {
    // SAFETY: an all-zero user_regs_struct is valid; PTRACE_GETREGS fills it.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: tid is stopped; regs is a valid user_regs_struct.
    if unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0, &raw mut regs) } != 0 {
        return None;
    }
    // At entry the kernel has set rax to -ENOSYS; at exit it holds the result.
    let entering = regs.rax == (-libc::ENOSYS) as u64;
    if !entering || regs.orig_rax != libc::SYS_connect as u64 {
        return None;
    }
    let len = std::mem::size_of::<libc::sockaddr_vm>();
    if regs.rdx < len as u64 {
        return None;
    }
    // The 16-byte sockaddr_vm as two words of the tracee's memory (PTRACE_PEEKDATA: the
    // guest kernel has no process_vm_readv).
    let mut bytes = [0u8; 16];
    for (i, chunk) in bytes.chunks_mut(8).enumerate() {
        // SAFETY: PEEKDATA reads one word of the stopped tracee; errors come back as -1 with
        // errno set, which a port check below cannot mistake for a vsock address.
        let word = unsafe { libc::ptrace(libc::PTRACE_PEEKDATA, tid, regs.rsi + 8 * i as u64, 0) };
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let family = u16::from_ne_bytes([bytes[0], bytes[1]]);
    let port = u32::from_ne_bytes(bytes[4..8].try_into().unwrap());
    let cid = u32::from_ne_bytes(bytes[8..12].try_into().unwrap());
    (family == libc::AF_VSOCK as u16 && cid == HOST_CID && port >= STDIO_PORT_BASE).then_some(port)
}

/// Connect to host port `port`, write the garbage, and say what came of it. The socket is
/// left open (and leaked) so that the host, not we, decides when it ends.
fn connect_first(port: u32) -> String {
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return format!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: an all-zero sockaddr_vm is valid; the fields are set below.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = HOST_CID;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    if unsafe { libc::connect(fd, (&raw const addr).cast(), len) } != 0 {
        return format!("connect: {}", std::io::Error::last_os_error());
    }
    // SAFETY: GARBAGE is a valid buffer of its length.
    let wrote = unsafe { libc::write(fd, GARBAGE.as_ptr().cast(), GARBAGE.len()) };
    // Whatever the host sends us (stdin meant for the container, if it took us for the
    // stream) is read by a thread of its own: the agent must not wait on us.
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut received = 0usize;
        loop {
            // SAFETY: buf is a valid buffer of its length; fd stays open (never closed).
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            received += n as usize;
        }
        say(&format!(
            "port {port}: the host closed it; received {received} bytes"
        ));
    });
    format!("wrote {wrote} bytes")
}

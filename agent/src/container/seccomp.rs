//! The OCI `linux.seccomp` profile, translated into classic BPF with `seccompiler` and
//! installed right before the command is executed.
//!
//! seccompiler builds filters with one "match" and one "mismatch" action, while an OCI
//! profile has an action per rule. The kernel runs every installed filter and keeps the most
//! restrictive answer, so one profile becomes several filters:
//! - a base filter: ALLOW when any rule of the profile matches, else the default action;
//! - per distinct rule action X (other than ALLOW): X when a rule with action X matches,
//!   else ALLOW.
//!
//! A call matching a rule gets that rule's action; one matching nothing gets the default.
//! Unknown syscall names are skipped, as runc does.
//!
//! Whatever the profile says, every container process also gets [`deny_vsock`]: AF_VSOCK
//! reaches the host's listeners, which are for the agent alone. And [`deny_io_uring`]: an
//! io_uring ring makes sockets (`IORING_OP_SOCKET`) and other calls without a syscall that a
//! seccomp filter sees, so it would walk around the AF_VSOCK rule.

#[cfg(target_arch = "aarch64")]
#[path = "syscall_table/aarch64.rs"]
mod table;
#[cfg(target_arch = "x86_64")]
#[path = "syscall_table/x86_64.rs"]
mod table;

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompOperator};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// EPERM, the errno of SCMP_ACT_ERRNO without errnoRet.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Compiles the profile into the filters to install (in order).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<BpfProgram>, String> {
    let names = table::make_syscall_table();
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut all_rules: Rules = BTreeMap::new();
    // Keyed by the action's Debug text, to group rules per action.
    let mut per_action: BTreeMap<String, (SeccompAction, Rules)> = BTreeMap::new();
    for syscall in profile.syscalls().iter().flatten() {
        let act = action(syscall.action(), syscall.errno_ret())?;
        let conditions = match syscall.args() {
            Some(args) if !args.is_empty() => args
                .iter()
                .map(|arg| {
                    let index = u8::try_from(arg.index())
                        .ok()
                        .filter(|i| *i < 6)
                        .ok_or_else(|| format!("seccomp arg index {} is over 5", arg.index()))?;
                    let (op, value) = match arg.op() {
                        LinuxSeccompOperator::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
                        LinuxSeccompOperator::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
                        LinuxSeccompOperator::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
                        LinuxSeccompOperator::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
                        LinuxSeccompOperator::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
                        LinuxSeccompOperator::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
                        // libseccomp: (arg & value) == valueTwo.
                        LinuxSeccompOperator::ScmpCmpMaskedEq => (
                            SeccompCmpOp::MaskedEq(arg.value()),
                            arg.value_two().unwrap_or(0),
                        ),
                    };
                    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
                        .map_err(|err| format!("bad seccomp condition: {err}"))
                })
                .collect::<Result<Vec<_>, String>>()
                .map(Some)?,
            _ => None,
        };
        let rule = match conditions {
            Some(conditions) => Some(
                SeccompRule::new(conditions).map_err(|err| format!("bad seccomp rule: {err}"))?,
            ),
            None => None,
        };
        for name in syscall.names() {
            let Some(nr) = names.get(name.as_str()).copied() else {
                crate::debug!("seccomp: skipping unknown syscall {name}");
                continue;
            };
            add_rule(&mut all_rules, nr, rule.clone());
            if act != SeccompAction::Allow {
                let entry = per_action
                    .entry(format!("{act:?}"))
                    .or_insert_with(|| (act.clone(), BTreeMap::new()));
                add_rule(&mut entry.1, nr, rule.clone());
            }
        }
    }
    let mut programs = Vec::new();
    if default != SeccompAction::Allow {
        programs.push(build(all_rules, default.clone(), SeccompAction::Allow)?);
    }
    for (_, (act, rules)) in per_action {
        if act == default && default != SeccompAction::Allow {
            // Already what the base filter answers for anything that is not allowed.
            continue;
        }
        programs.push(build(rules, SeccompAction::Allow, act)?);
    }
    Ok(programs)
}

/// AF_VSOCK (linux/socket.h), not in the libc crate for every target.
const AF_VSOCK: u64 = 40;

/// The filter every container process gets, installed after the OCI profile's (if any):
/// `socket(AF_VSOCK, ...)` and `socketpair(AF_VSOCK, ...)` fail with EPERM, every other call
/// is allowed (and left to the profile). The kernel runs all installed filters and keeps the
/// strictest answer, so a profile that kills or traps `socket` still wins; between two ERRNO
/// answers the newest filter's errno is used, which is why this one is installed last.
///
/// The domain is compared as the 32-bit `int` the kernel reads, so garbage in the upper half
/// of the register does not slip past. (The guest kernel has no IA32 or x32 ABI, so
/// `socketcall` and x32 numbers need no rule.)
pub fn deny_vsock() -> Result<BpfProgram, String> {
    let is_vsock = || {
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, AF_VSOCK)
            .and_then(|cond| SeccompRule::new(vec![cond]))
            .map_err(|err| format!("bad AF_VSOCK rule: {err}"))
    };
    let mut rules: Rules = BTreeMap::new();
    rules.insert(libc::SYS_socket, vec![is_vsock()?]);
    rules.insert(libc::SYS_socketpair, vec![is_vsock()?]);
    build(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
    )
}

/// The second filter every container process gets: `io_uring_setup`, `io_uring_enter` and
/// `io_uring_register` fail with ENOSYS, as on a kernel without io_uring, so programs take
/// their fallback path. Operations submitted through a ring are not seen by seccomp (a
/// socket made with `IORING_OP_SOCKET` never calls `socket(2)`), so without this rule
/// [`deny_vsock`] could be walked around. Docker's default profile denies io_uring too.
pub fn deny_io_uring() -> Result<BpfProgram, String> {
    let mut rules: Rules = BTreeMap::new();
    for nr in [
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ] {
        add_rule(&mut rules, nr, None);
    }
    build(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

/// Adds a rule (None = unconditional) for syscall `nr`. An empty rule list means
/// "unconditional" to seccompiler, so an unconditional rule wipes conditional ones.
fn add_rule(rules: &mut Rules, nr: i64, rule: Option<SeccompRule>) {
    match rule {
        None => {
            rules.insert(nr, Vec::new());
        }
        Some(rule) => match rules.get_mut(&nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.push(rule),
            None => {
                rules.insert(nr, vec![rule]);
            }
        },
    }
}

fn build(
    rules: Rules,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, mismatch, matched, ARCH)
        .map_err(|err| format!("cannot build the seccomp filter: {err}"))?;
    BpfProgram::try_from(filter).map_err(|err| format!("cannot compile the seccomp filter: {err}"))
}

fn action(act: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match act {
        LinuxSeccompAction::ScmpActAllow => SeccompAction::Allow,
        LinuxSeccompAction::ScmpActErrno => SeccompAction::Errno(errno.unwrap_or(DEFAULT_ERRNO)),
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            SeccompAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => SeccompAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => SeccompAction::Trap,
        LinuxSeccompAction::ScmpActLog => SeccompAction::Log,
        LinuxSeccompAction::ScmpActTrace => SeccompAction::Trace(errno.unwrap_or(0)),
        LinuxSeccompAction::ScmpActNotify => {
            return Err("seccomp action SCMP_ACT_NOTIFY is not supported".into())
        }
    })
}

/// Installs the filters on the calling thread. Without no_new_privs this needs
/// CAP_SYS_ADMIN (the OCI semantics: seccomp does not imply no_new_privs).
pub fn install(programs: &[BpfProgram]) -> std::io::Result<()> {
    for program in programs {
        let prog = libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "seccomp filter too long")
            })?,
            // seccompiler's sock_filter has the kernel's layout (code, jt, jf, k).
            filter: program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the kernel copies the program from the valid sock_fprog; nothing is kept.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_operator_and_arch_brig_features_lists_compiles() {
        use brig_protocols::features::{SECCOMP_ACTIONS, SECCOMP_ARCHS, SECCOMP_OPERATORS};
        for action in SECCOMP_ACTIONS {
            for op in SECCOMP_OPERATORS {
                let default = if *action == "SCMP_ACT_ALLOW" {
                    "SCMP_ACT_ERRNO"
                } else {
                    "SCMP_ACT_ALLOW"
                };
                let json = format!(
                    r#"{{"defaultAction":"{default}","architectures":{archs},"syscalls":[
                        {{"names":["mkdir"],"action":"{action}",
                          "args":[{{"index":1,"value":1,"valueTwo":1,"op":"{op}"}}]}}]}}"#,
                    archs = serde_json::to_string(SECCOMP_ARCHS).unwrap()
                );
                let profile: LinuxSeccomp =
                    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
                compile(&profile).unwrap_or_else(|e| panic!("{action} {op}: {e}"));
            }
        }
    }

    #[test]
    fn deny_list_and_allow_list_compile() {
        let deny: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir","mkdirat","no_such_call"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
        )
        .unwrap();
        assert_eq!(compile(&deny).unwrap().len(), 1);
        let allow: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW",
                 "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                {"names":["ptrace"],"action":"SCMP_ACT_KILL"}]}"#,
        )
        .unwrap();
        assert_eq!(compile(&allow).unwrap().len(), 2);
    }

    /// socket(domain, SOCK_STREAM, 0) as the raw system call: Ok(()) or the errno.
    fn try_socket(domain: u64) -> Result<(), i32> {
        // SAFETY: socket(2) with integer arguments; the fd it may return is closed below.
        let fd = unsafe { libc::syscall(libc::SYS_socket, domain, libc::SOCK_STREAM, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        // SAFETY: fd was just returned to us and is not used again.
        unsafe { libc::close(fd as i32) };
        Ok(())
    }

    fn try_socketpair(domain: i32) -> Result<(), i32> {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two fds into the valid array; they are closed below.
        if unsafe { libc::socketpair(domain, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        for fd in fds {
            // SAFETY: fd was just returned to us and is not used again.
            unsafe { libc::close(fd) };
        }
        Ok(())
    }

    /// Runs `body` on a thread of its own with no_new_privs and `programs` installed: both
    /// are per thread, so the test harness's other threads stay unfiltered.
    fn filtered<T: Send + 'static>(
        programs: Vec<BpfProgram>,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        std::thread::spawn(move || {
            // SAFETY: prctl with integer arguments only; it changes this thread alone.
            let set = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(set, 0);
            install(&programs).expect("install the filters");
            body()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn vsock_sockets_get_eperm_and_other_domains_work() {
        let results = filtered(vec![deny_vsock().unwrap()], || {
            (
                try_socket(AF_VSOCK),
                // The kernel reads the domain as an int: the upper half must not matter.
                try_socket((1 << 32) | AF_VSOCK),
                try_socketpair(AF_VSOCK as i32),
                try_socket(libc::AF_UNIX as u64),
                try_socketpair(libc::AF_UNIX),
                try_socket(libc::AF_INET as u64),
            )
        });
        assert_eq!(results.0, Err(libc::EPERM), "socket(AF_VSOCK)");
        assert_eq!(results.1, Err(libc::EPERM), "socket(AF_VSOCK | 1 << 32)");
        assert_eq!(results.2, Err(libc::EPERM), "socketpair(AF_VSOCK)");
        assert_eq!(results.3, Ok(()), "socket(AF_UNIX)");
        assert_eq!(results.4, Ok(()), "socketpair(AF_UNIX)");
        assert_eq!(results.5, Ok(()), "socket(AF_INET)");
    }

    /// io_uring_setup(2) with a one-entry ring; the ring's fd is closed again.
    fn try_io_uring_setup() -> Result<(), i32> {
        // struct io_uring_params is 120 bytes; all zero asks for the defaults.
        let mut params = [0u8; 120];
        // SAFETY: io_uring_setup reads and writes the 120-byte params buffer it is given.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
        }
        // SAFETY: fd was just returned to us and is not used again.
        unsafe { libc::close(fd as i32) };
        Ok(())
    }

    #[test]
    fn io_uring_is_enosys_and_other_calls_work() {
        let (setup, unix) = filtered(vec![deny_io_uring().unwrap()], || {
            (try_io_uring_setup(), try_socket(libc::AF_UNIX as u64))
        });
        assert_eq!(setup, Err(libc::ENOSYS), "io_uring_setup");
        assert_eq!(unix, Ok(()), "socket(AF_UNIX)");
    }

    #[test]
    fn vsock_is_denied_under_a_profile_and_the_profile_still_holds() {
        // Docker-style: allow by default, ENOSYS for mkdir.
        let profile: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":38}]}"#,
        )
        .unwrap();
        let mut programs = compile(&profile).unwrap();
        programs.push(deny_vsock().unwrap());
        let results = filtered(programs, || {
            let dir = std::ffi::CString::new("/nonexistent-brig-test-dir").unwrap();
            // SAFETY: mkdir with a valid NUL-terminated path.
            let mkdir = unsafe { libc::mkdir(dir.as_ptr(), 0o700) };
            let mkdir_errno = std::io::Error::last_os_error().raw_os_error();
            (
                try_socket(AF_VSOCK),
                try_socket(libc::AF_UNIX as u64),
                (mkdir, mkdir_errno),
            )
        });
        assert_eq!(results.0, Err(libc::EPERM), "socket(AF_VSOCK)");
        assert_eq!(results.1, Ok(()), "socket(AF_UNIX)");
        assert_eq!(results.2, (-1, Some(libc::ENOSYS)), "the profile's default");
    }

    #[test]
    fn a_profile_errno_for_socket_gives_way_to_eperm_for_vsock_only() {
        // A profile that answers EAFNOSUPPORT to every socket(): installed first, so ours,
        // the newest, decides the errno of AF_VSOCK; the rest keep the profile's answer.
        let profile: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["socket"],"action":"SCMP_ACT_ERRNO","errnoRet":97}]}"#,
        )
        .unwrap();
        let mut programs = compile(&profile).unwrap();
        programs.push(deny_vsock().unwrap());
        let results = filtered(programs, || {
            (try_socket(AF_VSOCK), try_socket(libc::AF_UNIX as u64))
        });
        assert_eq!(results.0, Err(libc::EPERM));
        assert_eq!(results.1, Err(libc::EAFNOSUPPORT));
    }
}

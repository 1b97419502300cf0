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
}

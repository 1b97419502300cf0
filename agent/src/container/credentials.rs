//! Who the container process runs as: rlimits, user and groups, capabilities.

use std::collections::HashSet;
use std::str::FromStr;

use caps::{CapSet, Capability as Cap, CapsHashSet};
use nix::sys::resource::Resource;
use nix::unistd::{Gid, Pid, Uid};
use oci_spec::runtime::{Capabilities, PosixRlimitType, Process};

type Result<T> = std::result::Result<T, String>;

/// Applies `process.rlimits` to the process `pid`, from the agent (prlimit): the process
/// may be in a user namespace already, where it could not raise a hard limit itself.
pub fn apply_rlimits(pid: Pid, process: &Process) -> Result<()> {
    for rlimit in process.rlimits().iter().flatten() {
        let resource = match rlimit.typ() {
            PosixRlimitType::RlimitCpu => Resource::RLIMIT_CPU,
            PosixRlimitType::RlimitFsize => Resource::RLIMIT_FSIZE,
            PosixRlimitType::RlimitData => Resource::RLIMIT_DATA,
            PosixRlimitType::RlimitStack => Resource::RLIMIT_STACK,
            PosixRlimitType::RlimitCore => Resource::RLIMIT_CORE,
            PosixRlimitType::RlimitRss => Resource::RLIMIT_RSS,
            PosixRlimitType::RlimitNproc => Resource::RLIMIT_NPROC,
            PosixRlimitType::RlimitNofile => Resource::RLIMIT_NOFILE,
            PosixRlimitType::RlimitMemlock => Resource::RLIMIT_MEMLOCK,
            PosixRlimitType::RlimitAs => Resource::RLIMIT_AS,
            PosixRlimitType::RlimitLocks => Resource::RLIMIT_LOCKS,
            PosixRlimitType::RlimitSigpending => Resource::RLIMIT_SIGPENDING,
            PosixRlimitType::RlimitMsgqueue => Resource::RLIMIT_MSGQUEUE,
            PosixRlimitType::RlimitNice => Resource::RLIMIT_NICE,
            PosixRlimitType::RlimitRtprio => Resource::RLIMIT_RTPRIO,
            PosixRlimitType::RlimitRttime => Resource::RLIMIT_RTTIME,
        };
        let limit = Rlimit64 {
            soft: rlimit.soft(),
            hard: rlimit.hard(),
        };
        // SAFETY: prlimit64 reads one valid struct rlimit64 (two u64s) and, with a null
        // old_limit, writes nothing.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                pid.as_raw(),
                resource as libc::c_int,
                &limit as *const Rlimit64,
                std::ptr::null_mut::<Rlimit64>(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "cannot set rlimit {:?} to soft {} hard {}: {}",
                rlimit.typ(),
                rlimit.soft(),
                rlimit.hard(),
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// The kernel's `struct rlimit64`.
#[repr(C)]
struct Rlimit64 {
    soft: u64,
    hard: u64,
}

fn to_caps(set: &Option<Capabilities>) -> Option<CapsHashSet> {
    set.as_ref().map(|set| {
        set.iter()
            .filter_map(|cap| {
                let name = serde_json::to_value(cap).ok()?;
                Cap::from_str(name.as_str()?).ok()
            })
            .collect::<HashSet<_>>()
    })
}

/// Switches to the spec's user and capabilities. Runs as root with all capabilities.
pub fn switch_user(process: &Process) -> Result<()> {
    let caps_spec = process.capabilities().as_ref();
    let bounding = caps_spec.and_then(|c| to_caps(c.bounding()));
    // The bounding set can only shrink while we still hold CAP_SETPCAP.
    if let Some(bounding) = &bounding {
        for cap in caps::all() {
            if !bounding.contains(&cap) {
                match caps::drop(None, CapSet::Bounding, cap) {
                    Ok(()) => {}
                    // Capabilities newer than this kernel.
                    Err(_)
                        if !caps::runtime::procfs_all_supported(None)
                            .map(|all| all.contains(&cap))
                            .unwrap_or(false) => {}
                    Err(err) => {
                        return Err(format!("cannot drop {cap} from the bounding set: {err}"))
                    }
                }
            }
        }
    }

    let user = process.user();
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "cannot keep capabilities: {}",
            std::io::Error::last_os_error()
        ));
    }
    let groups: Vec<Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups)
        .map_err(|err| format!("cannot set groups {groups:?}: {err}"))?;
    let (uid, gid) = (user.uid(), user.gid());
    nix::unistd::setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
        .map_err(|err| format!("cannot set gid {gid}: {err}"))?;
    nix::unistd::setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
        .map_err(|err| format!("cannot set uid {uid}: {err}"))?;
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    if let Some(umask) = user.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(umask & 0o777));
    }

    let Some(caps_spec) = caps_spec else {
        return Ok(());
    };
    let set = |which: CapSet, value: Option<CapsHashSet>| -> Result<()> {
        caps::set(None, which, &value.unwrap_or_default())
            .map_err(|err| format!("cannot set the {which:?} capabilities: {err}"))
    };
    // Order matters: inheritable while permitted is still full, effective before permitted
    // shrinks below it, ambient last (it needs permitted and inheritable).
    set(CapSet::Inheritable, to_caps(caps_spec.inheritable()))?;
    set(CapSet::Effective, to_caps(caps_spec.effective()))?;
    set(CapSet::Permitted, to_caps(caps_spec.permitted()))?;
    // A capability can only be ambient if it is permitted and inheritable too. Specs often
    // ask for ambient ones without inheritable (`runc spec` writes them so): as runc and
    // youki do, and as the runtime spec asks ("SHOULD NOT fail if ... cannot be granted"),
    // such a capability is left out rather than failing the container (a debug line only:
    // this runs in the container's init, whose stderr is the container's).
    if let Some(ambient) = to_caps(caps_spec.ambient()) {
        for cap in ambient {
            if let Err(err) = caps::raise(None, CapSet::Ambient, cap) {
                crate::debug!(
                    "ambient {cap} left out (it must be permitted and inheritable too): {err}"
                );
            }
        }
    }
    Ok(())
}

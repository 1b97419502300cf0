//! Capabilities: `brig-vmm` is started as root, but once its devices are set up it needs
//! only what the virtio-fs server uses to act on the shared directory for the guest (as
//! virtiofsd keeps), and without a share nothing at all. Everything else is dropped from
//! every set, the bounding set included, before the VM's threads start (they inherit it).

use caps::{CapSet, Capability, CapsHashSet};

/// What the virtio-fs passthrough server needs: file ownership and modes on the guest's
/// behalf, device nodes, and switching to the guest's credentials per request. (Extended
/// attributes are off in our server, so file capabilities cannot be set: no CAP_SETFCAP.)
const FS_SERVER: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
];

/// Errors lowering the capability sets.
#[derive(Debug, thiserror::Error)]
#[error("dropping capabilities ({what}): {reason}")]
pub struct PrivilegeError {
    what: &'static str,
    reason: String,
}

/// The capabilities `brig-vmm` keeps, given whether it serves a virtio-fs share.
pub fn kept(fs: bool) -> CapsHashSet {
    if fs {
        FS_SERVER.iter().copied().collect()
    } else {
        CapsHashSet::new()
    }
}

/// Drop every capability but `kept(fs)` from the calling thread (call it before spawning the
/// VM's threads). Lowering the bounding set needs CAP_SETPCAP: without it (a VMM started
/// unprivileged) only the other sets are lowered, which is always allowed.
pub fn drop_unneeded(fs: bool) -> Result<(), PrivilegeError> {
    let keep = kept(fs);
    let err = |what| {
        move |e: caps::errors::CapsError| PrivilegeError {
            what,
            reason: e.to_string(),
        }
    };
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all().difference(&keep) {
            // Capabilities this kernel does not know cannot be dropped (nor held).
            if let Err(e) = caps::drop(None, CapSet::Bounding, *cap) {
                if caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false) {
                    return Err(err("bounding set")(e));
                }
            }
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err("ambient set"))?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err("inheritable set"))?;
    let permitted =
        caps::read(None, CapSet::Permitted).map_err(err("reading the permitted set"))?;
    let now: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &now).map_err(err("effective set"))?;
    caps::set(None, CapSet::Permitted, &now).map_err(err("permitted set"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_share_nothing_is_kept() {
        assert!(kept(false).is_empty());
    }

    #[test]
    fn the_fs_server_keeps_only_file_capabilities() {
        let keep = kept(true);
        assert!(
            keep.contains(&Capability::CAP_DAC_OVERRIDE) && keep.contains(&Capability::CAP_SETUID)
        );
        for cap in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_PTRACE,
            Capability::CAP_SYS_MODULE,
        ] {
            assert!(!keep.contains(&cap), "{cap} is kept");
        }
    }

    #[test]
    fn dropping_leaves_only_the_kept_set_in_a_thread() {
        // Capabilities are per thread: do it in one and read the result there.
        let left = std::thread::spawn(|| {
            drop_unneeded(true).unwrap();
            (
                caps::read(None, CapSet::Effective).unwrap(),
                caps::read(None, CapSet::Permitted).unwrap(),
            )
        })
        .join()
        .unwrap();
        let keep = kept(true);
        assert!(left.0.is_subset(&keep), "effective: {:?}", left.0);
        assert!(left.1.is_subset(&keep), "permitted: {:?}", left.1);
    }
}

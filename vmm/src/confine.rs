//! The VMM's own view of the file system: once its devices exist, `brig-vmm` moves into a
//! mount namespace of its own whose root is the sandbox directory (the one holding its vsock
//! socket and the virtio-fs share), as virtiofsd does with its shared directory. A bug in the
//! file server's path handling then cannot name anything of the host outside that directory.
//!
//! Inside, the sandbox directory is `/`, a fresh procfs is at `/proc` (the file server
//! reopens files through `/proc/self/fd`), and mounts the runtime adds under the sandbox
//! directory later (container root filesystems, volumes) still appear: our mounts are slaves
//! of the host's, so they receive its mounts and never send any back. For that the runtime
//! makes the sandbox directory a shared mount before it starts the VMM.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// The host path of our root once confined.
static ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Errors entering the confinement.
#[derive(Debug, thiserror::Error)]
#[error("cannot confine the VMM to {root} ({step}): {source} (brig-vmm needs CAP_SYS_ADMIN for this; --no-confine skips it)")]
pub struct ConfineError {
    root: PathBuf,
    step: &'static str,
    source: nix::Error,
}

/// Move the calling process (before it starts threads) into its own mount namespace with
/// `root` as `/`. `root` must be a canonical directory path.
pub fn enter(root: &Path) -> Result<(), ConfineError> {
    let err = |step| {
        move |source| ConfineError {
            root: root.to_path_buf(),
            step,
            source,
        }
    };
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(err("unshare"))?;
    // Receive the host's mount events, send none back.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(err("making mounts slaves"))?;
    // pivot_root needs a mount point; binding the directory onto itself makes one (a slave
    // again if it was the runtime's shared mount).
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("binding the root"))?;
    let proc = root.join("proc");
    match std::fs::create_dir(&proc) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(err("creating /proc")(nix::Error::from_raw(
                e.raw_os_error().unwrap_or(libc::EIO),
            )))
        }
    }
    nix::unistd::chdir(root).map_err(err("chdir"))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root"))?;
    // The old root is stacked on the new one: detach it, and with it every host mount.
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(err("chdir /"))?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err("mounting /proc"))?;
    let _ = ROOT.set(root.to_path_buf());
    Ok(())
}

/// `path` with its directory made canonical (the file itself need not exist), so that
/// [`visible`] can place it; `path` as given if its directory cannot be resolved. Call it
/// before [`enter`]: afterwards host paths no longer resolve.
pub fn canonical(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (std::fs::canonicalize(dir), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// Where host path `path` (canonical, see [`canonical`]) is seen from the VMM: itself before [`enter`], else relative to the
/// new root (`None` if it lies outside it).
pub fn visible(path: &Path) -> Option<PathBuf> {
    match ROOT.get() {
        None => Some(path.to_path_buf()),
        Some(root) => path
            .strip_prefix(root)
            .ok()
            .map(|rest| Path::new("/").join(rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unchanged_until_confined() {
        assert_eq!(
            visible(Path::new("/run/brig/x/vsock.sock")),
            Some(PathBuf::from("/run/brig/x/vsock.sock"))
        );
    }

    #[test]
    fn canonical_resolves_the_directory_only() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        let sub = real.join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert_eq!(
            canonical(&sub.join("../missing.sock")),
            real.join("missing.sock")
        );
    }
}

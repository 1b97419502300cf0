//! The sandbox's virtio-fs share: one host directory the VMM exports, into which container
//! root filesystems and volumes are bind-mounted.
//!
//! Removing a share must never delete a user's files through a bind mount that is still
//! there: every mount under the share is detached first, and the removal itself refuses to
//! cross into another filesystem.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Where the agent mounts the share inside the guest.
pub const GUEST_SHARE_DIR: &str = "/run/brig/shared";
/// The virtio-fs tag of the share.
pub const SHARE_TAG: &str = "brig";

/// Errors preparing or removing share contents.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A bind mount failed.
    #[error("cannot bind-mount {src} into the sandbox share: {source}")]
    Bind { src: PathBuf, source: nix::Error },
    /// A directory could not be made or removed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Something is still mounted under the share.
    #[error("cannot unmount {path}: {source}; left in place so no data is lost")]
    Unmount { path: PathBuf, source: nix::Error },
}

/// Make the sandbox directory `dir` a mount point with shared propagation (a bind onto
/// itself). brig-vmm confines itself to `dir` in a mount namespace whose mounts are slaves of
/// ours: what is bind-mounted under `dir` later (root filesystems, volumes) reaches it only
/// through a shared mount. [`remove`] undoes it with the rest.
pub fn make_shared(dir: &Path) -> Result<(), ShareError> {
    let err = |source| ShareError::Bind {
        src: dir.to_path_buf(),
        source,
    };
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(err)
}

/// Bind-mount `src` at `dst` (created if needed), `nosuid,nodev`, read-only if asked. The
/// VMM's file server opens what the guest names under the share: `nodev` keeps a device
/// node in an image or volume from opening the host's device, `nosuid` keeps a host process
/// from gaining privileges through a guest-written setuid file. (The guest sees the files'
/// modes as they are; its own kernel decides what setuid means inside.)
pub fn bind(src: &Path, dst: &Path, read_only: bool) -> Result<(), ShareError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ShareError::Io {
            what: "cannot create",
            path,
            source,
        }
    };
    if src.is_dir() {
        std::fs::create_dir_all(dst).map_err(io(dst))?;
    } else {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        std::fs::write(dst, b"").map_err(io(dst))?;
    }
    let bind_err = |source| ShareError::Bind {
        src: src.to_path_buf(),
        source,
    };
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(bind_err)?;
    // Keep host mount events from propagating in and ours from propagating out.
    let _ = mount(
        None::<&str>,
        dst,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    );
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    if let Err(e) = mount(None::<&str>, dst, None::<&str>, flags, None::<&str>) {
        let _ = umount2(dst, MntFlags::MNT_DETACH);
        return Err(bind_err(e));
    }
    Ok(())
}

/// Every mount point at or below `dir`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

fn unescape_mountinfo(field: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detach every mount under `dir`, then remove `dir` without crossing into another
/// filesystem. If something stays mounted, nothing under it is touched.
pub fn remove(dir: &Path) -> Result<(), ShareError> {
    if !dir.exists() {
        return Ok(());
    }
    for m in mounts_under(dir) {
        umount2(&m, MntFlags::MNT_DETACH).map_err(|source| ShareError::Unmount {
            path: m.clone(),
            source,
        })?;
    }
    if let Some(m) = mounts_under(dir).into_iter().next() {
        return Err(ShareError::Unmount {
            path: m,
            source: nix::Error::EBUSY,
        });
    }
    let dev = std::fs::symlink_metadata(dir)
        .map_err(|source| ShareError::Io {
            what: "cannot stat",
            path: dir.into(),
            source,
        })?
        .dev();
    remove_same_fs(dir, dev)
}

fn remove_same_fs(path: &Path, dev: u64) -> Result<(), ShareError> {
    let io = |what| {
        move |source| ShareError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let meta = std::fs::symlink_metadata(path).map_err(io("cannot stat"))?;
    if meta.dev() != dev {
        return Err(ShareError::Unmount {
            path: path.into(),
            source: nix::Error::EXDEV,
        });
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io("cannot list"))? {
            let entry = entry.map_err(io("cannot list"))?;
            remove_same_fs(&entry.path(), dev)?;
        }
        std::fs::remove_dir(path).map_err(io("cannot remove"))
    } else {
        std::fs::remove_file(path).map_err(io("cannot remove"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\"), "/x\\");
    }

    #[test]
    fn removing_a_share_never_deletes_through_a_bind_mount() {
        // Needs root (mount). The host running the unit tests is root in CI.
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let base = std::env::temp_dir().join(format!("brig-share-{}", std::process::id()));
        let user_dir = base.join("user-data");
        let share = base.join("share");
        std::fs::create_dir_all(&user_dir).unwrap();
        std::fs::write(user_dir.join("precious"), b"keep me").unwrap();
        std::fs::create_dir_all(&share).unwrap();
        bind(&user_dir, &share.join("c1/rootfs"), false).unwrap();
        bind(&user_dir, &share.join("c1/volumes/0"), true).unwrap();
        assert!(
            std::fs::write(share.join("c1/volumes/0/x"), b"").is_err(),
            "read-only bind accepted a write"
        );
        assert_eq!(mounts_under(&share).len(), 2);
        // Both binds are nosuid,nodev: the VMM never opens a host device through them.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for dst in ["c1/rootfs", "c1/volumes/0"] {
            let path = share.join(dst);
            let line = mountinfo
                .lines()
                .find(|l| l.split(' ').nth(4) == path.to_str())
                .unwrap_or_else(|| panic!("{} not mounted: {mountinfo}", path.display()));
            let options = line.split(' ').nth(5).unwrap_or_default();
            assert!(
                options.split(',').any(|o| o == "nosuid")
                    && options.split(',').any(|o| o == "nodev"),
                "{dst}: {line}"
            );
        }
        remove(&share).unwrap();
        assert!(!share.exists());
        assert_eq!(
            std::fs::read(user_dir.join("precious")).unwrap(),
            b"keep me"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! A container's root filesystem made of an image's layers: an overlay whose lower layers
//! are the image's (read-only, shared by every container of the image) and whose upper and
//! work directories are the container's own, in a scratch directory of the image store:
//!
//! ```text
//! <scratch>/upper/   what the container wrote
//! <scratch>/work/    overlayfs's work directory
//! <scratch>/rootfs/  the overlay: the container's root filesystem
//! ```
//!
//! The container's record names the scratch directory; removing the container unmounts the
//! overlay and removes the directory ([`remove_overlay`]).

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Errors making or removing an overlay root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("the image's layer paths are too long for one overlay mount ({0} bytes of options, the kernel takes 4095): move image_root to a shorter path")]
    TooLong(usize),
    #[error(
        "layer path {0} contains ':' or ',', which overlayfs options cannot carry: move image_root"
    )]
    BadPath(PathBuf),
}

/// Mount an overlay of `lowers` (top first) with its writable layer in `scratch`, made
/// here; returns the root filesystem's path. On error nothing is left behind.
pub fn mount_overlay(lowers: &[PathBuf], scratch: &Path) -> Result<PathBuf, RootfsError> {
    for dir in lowers.iter().map(PathBuf::as_path).chain([scratch]) {
        let text = dir.as_os_str().as_encoded_bytes();
        if text.contains(&b':') || text.contains(&b',') {
            return Err(RootfsError::BadPath(dir.to_path_buf()));
        }
    }
    let (upper, work, rootfs) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("rootfs"),
    );
    let lowerdir: Vec<String> = lowers.iter().map(|l| l.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    if options.len() > 4095 {
        return Err(RootfsError::TooLong(options.len()));
    }
    let made = (|| {
        for dir in [&upper, &work, &rootfs] {
            std::fs::create_dir_all(dir).map_err(|source| RootfsError::Io {
                action: "creating",
                path: dir.clone(),
                cause: source,
            })?;
        }
        mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::MS_NODEV,
            Some(options.as_str()),
        )
        .map_err(|e| RootfsError::Io {
            action: "mounting an overlay of the image's layers on",
            path: rootfs.clone(),
            cause: e.into(),
        })
    })();
    match made {
        Ok(()) => Ok(rootfs),
        Err(e) => {
            let _ = std::fs::remove_dir_all(scratch);
            Err(e)
        }
    }
}

/// Unmount the overlay in `scratch` (if mounted) and remove the directory; a missing one
/// is fine.
pub fn remove_overlay(scratch: &Path) -> Result<(), RootfsError> {
    let rootfs = scratch.join("rootfs");
    match umount2(&rootfs, MntFlags::MNT_DETACH) {
        // Not mounted (EINVAL) or gone (ENOENT): nothing to unmount.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(RootfsError::Io {
                action: "unmounting",
                path: rootfs,
                cause: e.into(),
            })
        }
    }
    match std::fs::remove_dir_all(scratch) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RootfsError::Io {
            action: "removing",
            path: scratch.to_path_buf(),
            cause: source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_overlayfs_cannot_carry_are_refused_before_anything_is_made() {
        let dir = std::env::temp_dir().join(format!("brig-rootfs-test-{}", std::process::id()));
        let scratch = dir.join("scratch");
        let err = mount_overlay(&[PathBuf::from("/store/la:yer")], &scratch).unwrap_err();
        assert!(matches!(err, RootfsError::BadPath(_)), "{err}");
        let long: Vec<PathBuf> = (0..50)
            .map(|i| PathBuf::from(format!("/{}/{i}", "x".repeat(90))))
            .collect();
        assert!(matches!(
            mount_overlay(&long, &scratch),
            Err(RootfsError::TooLong(_))
        ));
        assert!(!scratch.exists());
        remove_overlay(&scratch).unwrap();
    }

    /// Needs root (overlay mounts), as Brig does; `make test` runs unit tests as root.
    #[test]
    fn a_container_writes_into_its_scratch_and_never_into_the_image() {
        let dir = std::env::temp_dir().join(format!("brig-rootfs-mount-{}", std::process::id()));
        let (bottom, top) = (dir.join("layers/bottom"), dir.join("layers/top"));
        std::fs::create_dir_all(&bottom).unwrap();
        std::fs::create_dir_all(&top).unwrap();
        std::fs::write(bottom.join("base.txt"), "base").unwrap();
        std::fs::write(bottom.join("both.txt"), "bottom").unwrap();
        std::fs::write(top.join("both.txt"), "top").unwrap();
        let lowers = vec![top.clone(), bottom.clone()];

        let one = mount_overlay(&lowers, &dir.join("one")).unwrap();
        let two = mount_overlay(&lowers, &dir.join("two")).unwrap();
        assert_eq!(
            std::fs::read_to_string(one.join("both.txt")).unwrap(),
            "top"
        );
        std::fs::write(one.join("base.txt"), "changed").unwrap();
        std::fs::remove_file(one.join("both.txt")).unwrap();
        assert_eq!(
            std::fs::read_to_string(two.join("base.txt")).unwrap(),
            "base"
        );
        assert_eq!(
            std::fs::read_to_string(bottom.join("base.txt")).unwrap(),
            "base"
        );
        assert!(two.join("both.txt").exists() && top.join("both.txt").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("one/upper/base.txt")).unwrap(),
            "changed"
        );

        remove_overlay(&dir.join("one")).unwrap();
        remove_overlay(&dir.join("two")).unwrap();
        assert!(!dir.join("one").exists() && !dir.join("two").exists());
        assert_eq!(
            std::fs::read_to_string(bottom.join("base.txt")).unwrap(),
            "base"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn image_users_resolve_through_the_images_own_files() {
        let dir = std::env::temp_dir().join(format!("brig-rootfs-user-{}", std::process::id()));
        let etc = dir.join("rootfs/etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1234:1235::/data:/bin/sh\n",
        )
        .unwrap();
        // The group file points at the host's: it must be read inside the root filesystem.
        std::fs::write(dir.join("rootfs/hostgroup"), "staff:x:50:\n").unwrap();
        std::os::unix::fs::symlink("/hostgroup", etc.join("group")).unwrap();
        let root = dir.join("rootfs");
        assert_eq!(lookup_user(&root, "app").unwrap(), (1234, 1235));
        assert_eq!(lookup_user(&root, "1234").unwrap(), (1234, 1235));
        assert_eq!(lookup_user(&root, "77").unwrap(), (77, 0));
        assert_eq!(lookup_user(&root, "app:staff").unwrap(), (1234, 50));
        assert_eq!(lookup_user(&root, "5:6").unwrap(), (5, 6));
        let err = lookup_user(&root, "nobody").unwrap_err().to_string();
        assert!(
            err.contains("\"nobody\" is not in the image's /etc/passwd"),
            "{err}"
        );
        assert!(lookup_user(&root, "app:wheel").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Resolve an image's `USER` (`name`, `uid`, `name:group`, `uid:gid`…) to numeric IDs
/// through the root filesystem's `/etc/passwd` and `/etc/group`, as docker does. The files
/// are opened with every path resolved inside `rootfs` (`RESOLVE_IN_ROOT`): an image's
/// `/etc/passwd` that is a symlink to a host path reads the image's own file of that name.
pub fn lookup_user(rootfs: &Path, user: &str) -> Result<(u32, u32), UserError> {
    let (name, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_in_root(rootfs, "etc/passwd");
    // name:x:uid:gid:…
    let entry = |file: &str, key: &str| -> Option<Vec<String>> {
        file.lines()
            .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.len() >= 3 && (f[0] == key || f[2] == key))
    };
    let (uid, passwd_gid) = match name.parse::<u32>() {
        Ok(uid) => (
            uid,
            entry(&passwd, name).and_then(|f| f.get(3).and_then(|g| g.parse().ok())),
        ),
        Err(_) => {
            let f = entry(&passwd, name).ok_or_else(|| UserError {
                what: "user",
                name: name.to_string(),
                file: "/etc/passwd",
            })?;
            let uid = f[2].parse().map_err(|_| UserError {
                what: "user",
                name: name.to_string(),
                file: "/etc/passwd",
            })?;
            (uid, f.get(3).and_then(|g| g.parse().ok()))
        }
    };
    let gid = match group {
        None => passwd_gid.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => entry(&read_in_root(rootfs, "etc/group"), g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| UserError {
                    what: "group",
                    name: g.to_string(),
                    file: "/etc/group",
                })?,
        },
    };
    Ok((uid, gid))
}

/// A user or group an image names that its files do not have.
#[derive(Debug, thiserror::Error)]
#[error("{what} {name:?} is not in the image's {file}: use a numeric ID (--user UID[:GID])")]
pub struct UserError {
    what: &'static str,
    name: String,
    file: &'static str,
}

/// The text of `path` inside `rootfs` (at most 1 MiB), or nothing.
fn read_in_root(rootfs: &Path, path: &str) -> String {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    use std::io::Read;
    let Ok(root) = std::fs::File::open(rootfs) else {
        return String::new();
    };
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let Ok(fd) = openat2(&root, path, how) else {
        return String::new();
    };
    let file = std::fs::File::from(fd);
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return String::new();
    }
    let mut text = String::new();
    let _ = file.take(1 << 20).read_to_string(&mut text);
    text
}

//! Unpack one layer (a tar stream) into an empty directory, in the form overlayfs reads as a
//! lower layer: a whiteout `.wh.NAME` becomes the character device 0/0 `NAME`, an opaque
//! marker `.wh..wh..opq` becomes the `trusted.overlay.opaque` attribute of its directory.
//!
//! A layer comes from a registry, so it is untrusted. No entry can write outside the
//! directory: every path is walked one name at a time from the layer's directory with
//! `O_NOFOLLOW`, a `..` name is refused, and so is a path through a symlink (the layer's own:
//! each layer is unpacked alone, so there is no other). Hard links must name an entry inside
//! the layer. Only `security.capability` and `user.*` extended attributes are kept (a
//! `trusted.overlay.*` one could steer the host's overlayfs).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The tar stream itself is broken (or its decompression failed).
    #[error("the layer is not a readable tar archive: {0}")]
    Tar(std::io::Error),
    /// An entry whose path leaves the layer's directory.
    #[error("entry {entry:?} points outside the layer ({why}): the image is broken or hostile")]
    Escape { entry: String, why: &'static str },
    /// A file system call failed for one entry.
    #[error("entry {entry:?}: {action}: {cause}")]
    Io {
        entry: String,
        action: &'static str,
        cause: std::io::Error,
    },
}

/// The name overlayfs (and the OCI image spec) use for an opaque directory.
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The prefix of a whiteout in a layer's tar.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Extended attributes a layer may set; anything else (`trusted.*`, `security.selinux`…)
/// is not the image's business on this host.
fn xattr_allowed(name: &[u8]) -> bool {
    name == b"security.capability" || name.starts_with(b"user.")
}

/// Unpack the tar stream `reader` into `dest`, an existing empty directory.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<(), UnpackError> {
    let root = open_root(dest).map_err(|source| UnpackError::Io {
        entry: String::new(),
        action: "opening the layer directory",
        cause: source,
    })?;
    let mut archive = tar::Archive::new(reader);
    let mut dir_times: Vec<(Vec<OsString>, TimeSpec)> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Tar)? {
        let mut entry = entry.map_err(UnpackError::Tar)?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let names = split_path(&raw_path, &shown)?;
        let Some((name, parents)) = names.split_last() else {
            continue; // the layer's root itself ("./"): its metadata is the image's business
        };
        let io = |action: &'static str| {
            let entry = shown.clone();
            move |source: std::io::Error| UnpackError::Io {
                entry,
                action,
                cause: source,
            }
        };
        let parent = walk(&root, parents, true, &shown)?;
        let header = entry.header().clone();
        let uid = header
            .uid()
            .ok()
            .and_then(|u| u32::try_from(u).ok())
            .unwrap_or(0);
        let gid = header
            .gid()
            .ok()
            .and_then(|g| u32::try_from(g).ok())
            .unwrap_or(0);
        let mode = Mode::from_bits_truncate(header.mode().unwrap_or(0o644) & 0o7777);
        let mtime = TimeSpec::new(
            header
                .mtime()
                .ok()
                .and_then(|t| i64::try_from(t).ok())
                .unwrap_or(0),
            0,
        );
        let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));

        if name.as_bytes() == OPAQUE_MARKER {
            set_xattr(parent.as_fd(), b"trusted.overlay.opaque", b"y")
                .map_err(io("marking the directory opaque"))?;
            continue;
        }
        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            let hidden = OsStr::from_bytes(hidden);
            check_name(hidden, &shown)?;
            remove_existing(&parent, hidden).map_err(io("replacing what the whiteout hides"))?;
            mknodat(&parent, hidden, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(|e| io("creating the whiteout")(e.into()))?;
            continue;
        }
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Directory => {
                match openat(
                    &parent,
                    name.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(_) => {}
                    Err(_) => {
                        remove_existing(&parent, name).map_err(io("replacing an entry"))?;
                        mkdirat(&parent, name.as_os_str(), Mode::from_bits_truncate(0o700))
                            .map_err(|e| io("creating the directory")(e.into()))?;
                    }
                }
                let dir = open_dir(&parent, name).map_err(io("opening the directory"))?;
                fchown(&dir, owner.0, owner.1).map_err(|e| io("setting the owner")(e.into()))?;
                fchmod(&dir, mode).map_err(|e| io("setting the mode")(e.into()))?;
                set_pax_xattrs(&mut entry, dir.as_fd()).map_err(io("setting an attribute"))?;
                dir_times.push((names.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                remove_existing(&parent, name).map_err(io("replacing an entry"))?;
                let fd = openat(
                    &parent,
                    name.as_os_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(|e| io("creating the file")(e.into()))?;
                let mut file = std::fs::File::from(fd);
                std::io::copy(&mut entry, &mut file).map_err(io("writing the file"))?;
                // Owner before mode: chown clears set-user-ID bits.
                fchown(&file, owner.0, owner.1).map_err(|e| io("setting the owner")(e.into()))?;
                fchmod(&file, mode).map_err(|e| io("setting the mode")(e.into()))?;
                set_pax_xattrs(&mut entry, file.as_fd()).map_err(io("setting an attribute"))?;
                futimens(&file, &mtime, &mtime).map_err(|e| io("setting the time")(e.into()))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                remove_existing(&parent, name).map_err(io("replacing an entry"))?;
                symlinkat(OsStr::from_bytes(&target), &parent, name.as_os_str())
                    .map_err(|e| io("creating the symlink")(e.into()))?;
                fchownat(
                    &parent,
                    name.as_os_str(),
                    owner.0,
                    owner.1,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io("setting the owner")(e.into()))?;
                utimensat(
                    &parent,
                    name.as_os_str(),
                    &mtime,
                    &mtime,
                    UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| io("setting the time")(e.into()))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target_names = split_path(&target, &shown)?;
                let Some((target_name, target_parents)) = target_names.split_last() else {
                    return Err(UnpackError::Escape {
                        entry: shown,
                        why: "a hard link to the layer's root",
                    });
                };
                let target_parent = walk(&root, target_parents, false, &shown)?;
                remove_existing(&parent, name).map_err(io("replacing an entry"))?;
                linkat(
                    &target_parent,
                    target_name.as_os_str(),
                    &parent,
                    name.as_os_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| io("creating the hard link")(e.into()))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let sflag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                remove_existing(&parent, name).map_err(io("replacing an entry"))?;
                mknodat(
                    &parent,
                    name.as_os_str(),
                    sflag,
                    Mode::empty(),
                    libc::makedev(major, minor),
                )
                .map_err(|e| io("creating the device node")(e.into()))?;
                fchownat(
                    &parent,
                    name.as_os_str(),
                    owner.0,
                    owner.1,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io("setting the owner")(e.into()))?;
                fchmodat(
                    &parent,
                    name.as_os_str(),
                    mode,
                    FchmodatFlags::FollowSymlink,
                )
                .map_err(|e| io("setting the mode")(e.into()))?;
            }
            // PAX and GNU long-name headers are read by the tar crate; global PAX headers
            // and anything else carry nothing a root filesystem needs.
            _ => {}
        }
    }
    // Directory times last: creating their entries changed them.
    for (names, mtime) in dir_times.iter().rev() {
        if let Some((name, parents)) = names.split_last() {
            if let Ok(parent) = walk(&root, parents, false, "") {
                let _ = utimensat(
                    &parent,
                    name.as_os_str(),
                    mtime,
                    mtime,
                    UtimensatFlags::NoFollowSymlink,
                );
            }
        }
    }
    Ok(())
}

/// The names of a tar path, relative to the layer: a leading `/` or `./` is dropped (tar
/// files of root filesystems carry both), `.` and empty names are skipped, `..` is refused.
fn split_path(raw: &[u8], shown: &str) -> Result<Vec<OsString>, UnpackError> {
    let mut names = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::Escape {
                    entry: shown.to_string(),
                    why: "it contains ..",
                })
            }
            name => names.push(OsStr::from_bytes(name).to_os_string()),
        }
    }
    Ok(names)
}

/// A whiteout's target must be one plain name too.
fn check_name(name: &OsStr, shown: &str) -> Result<(), UnpackError> {
    match name.as_bytes() {
        b"" | b"." | b".." => Err(UnpackError::Escape {
            entry: shown.to_string(),
            why: "a whiteout of no single name",
        }),
        _ => Ok(()),
    }
}

/// Open the directory `names` below `root`, one name at a time and never through a
/// symlink; with `create`, missing directories are made (mode 0755, root's).
fn walk(
    root: &OwnedFd,
    names: &[OsString],
    create: bool,
    shown: &str,
) -> Result<OwnedFd, UnpackError> {
    let mut dir = nix::unistd::dup(root).map_err(|e| UnpackError::Io {
        entry: shown.to_string(),
        action: "opening the layer directory",
        cause: e.into(),
    })?;
    for name in names {
        dir = match open_dir(&dir, name) {
            Ok(next) => next,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create => {
                mkdirat(&dir, name.as_os_str(), Mode::from_bits_truncate(0o755)).map_err(|e| {
                    UnpackError::Io {
                        entry: shown.to_string(),
                        action: "creating a parent directory",
                        cause: e.into(),
                    }
                })?;
                open_dir(&dir, name).map_err(|e| UnpackError::Io {
                    entry: shown.to_string(),
                    action: "opening a parent directory",
                    cause: e,
                })?
            }
            // O_NOFOLLOW on a symlink: ELOOP; O_DIRECTORY on one with O_NOFOLLOW: ENOTDIR.
            Err(e) if is_symlink(&dir, name) => {
                let _ = e;
                return Err(UnpackError::Escape {
                    entry: shown.to_string(),
                    why: "its path goes through a symlink",
                });
            }
            Err(source) => {
                return Err(UnpackError::Io {
                    entry: shown.to_string(),
                    action: "opening a parent directory",
                    cause: source,
                })
            }
        };
    }
    Ok(dir)
}

/// `dest` itself, which must be a directory and not a symlink.
fn open_root(dest: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dest)?;
    Ok(file.into())
}

fn open_dir(parent: &impl AsFd, name: &OsStr) -> std::io::Result<OwnedFd> {
    openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(Into::into)
}

fn is_symlink(dir: &OwnedFd, name: &OsStr) -> bool {
    nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK)
        .unwrap_or(false)
}

/// Remove whatever `name` is in `parent` (a later entry of a tar replaces an earlier one);
/// a directory with all it holds. Nothing there is fine.
fn remove_existing(parent: &OwnedFd, name: &OsStr) -> std::io::Result<()> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => Ok(()),
        Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => {
            // The parent was opened without following symlinks, so this path names it.
            let path = PathBuf::from(format!("/proc/self/fd/{}", parent.as_raw_fd())).join(name);
            std::fs::remove_dir_all(path)
        }
        Err(e) => Err(e.into()),
    }
}

/// The PAX `SCHILY.xattr.*` records of `entry` that a layer may set, applied to `fd`.
fn set_pax_xattrs<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    fd: BorrowedFd<'_>,
) -> std::io::Result<()> {
    let Ok(Some(extensions)) = entry.pax_extensions() else {
        return Ok(());
    };
    for ext in extensions.flatten() {
        if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
            if xattr_allowed(name) {
                set_xattr(fd, name, ext.value_bytes())?;
            }
        }
    }
    Ok(())
}

fn set_xattr(fd: BorrowedFd<'_>, name: &[u8], value: &[u8]) -> std::io::Result<()> {
    let name = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `name` is NUL-terminated, `value` is a live slice of `value.len()` bytes, and
    // `fd` is an open descriptor borrowed for the call.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A tar with the given entries: (path, kind, content or link target).
    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(if *kind == tar::EntryType::Directory {
                0o755
            } else {
                0o644
            });
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_600_000_000);
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    header.set_size(0);
                    // set_path/set_link_name refuse "..": write the bytes as they come.
                    raw_name(&mut header, path);
                    header.as_old_mut().linkname[..data.len()].copy_from_slice(data.as_bytes());
                    header.set_cksum();
                    builder.append(&header, std::io::empty()).unwrap();
                }
                _ => {
                    header.set_size(data.len() as u64);
                    raw_name(&mut header, path);
                    header.set_cksum();
                    builder.append(&header, data.as_bytes()).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    fn raw_name(header: &mut tar::Header, path: &str) {
        let name = &mut header.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
    }

    fn unpack_into(
        entries: &[(&str, tar::EntryType, &str)],
    ) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        let result = unpack(&tar_of(entries)[..], &layer);
        (dir, result)
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn files_dirs_links_and_symlinks_land_in_the_layer() {
        let (dir, result) = unpack_into(&[
            ("./etc/", D, ""),
            ("./etc/hostname", F, "box\n"),
            ("./etc/hard", H, "etc/hostname"),
            ("./bin", S, "/usr/bin"),
            ("usr/bin/tool", F, "#!"),
        ]);
        result.unwrap();
        let layer = dir.path().join("layer");
        assert_eq!(
            std::fs::read_to_string(layer.join("etc/hostname")).unwrap(),
            "box\n"
        );
        let a = std::fs::metadata(layer.join("etc/hostname")).unwrap();
        let b = std::fs::metadata(layer.join("etc/hard")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert_eq!(
            std::fs::read_link(layer.join("bin")).unwrap(),
            Path::new("/usr/bin")
        );
        assert_eq!(std::fs::read(layer.join("usr/bin/tool")).unwrap(), b"#!");
        assert_eq!(a.mtime(), 1_600_000_000);
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let (dir, result) = unpack_into(&[
            ("data/", D, ""),
            ("data/.wh.gone.txt", F, ""),
            ("data/.wh..wh..opq", F, ""),
        ]);
        result.unwrap();
        let layer = dir.path().join("layer");
        let meta = std::fs::symlink_metadata(layer.join("data/gone.txt")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert_eq!(meta.rdev(), 0);
        assert!(!layer.join("data/.wh.gone.txt").exists());
        let mut buf = [0u8; 4];
        let path = std::ffi::CString::new(layer.join("data").as_os_str().as_bytes()).unwrap();
        let name = c"trusted.overlay.opaque";
        // SAFETY: both strings are NUL-terminated and `buf` is a live buffer of its length.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(
            n,
            1,
            "opaque attribute: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(buf[0], b'y');
    }

    #[test]
    fn a_later_entry_replaces_an_earlier_one() {
        let (dir, result) = unpack_into(&[
            ("a", F, "one"),
            ("a", F, "two"),
            ("d/x", F, "x"),
            ("d", F, "file now"),
        ]);
        result.unwrap();
        let layer = dir.path().join("layer");
        assert_eq!(std::fs::read_to_string(layer.join("a")).unwrap(), "two");
        assert_eq!(
            std::fs::read_to_string(layer.join("d")).unwrap(),
            "file now"
        );
    }

    #[test]
    fn dot_dot_is_refused_and_nothing_is_written_outside() {
        let (dir, result) = unpack_into(&[("ok", F, ""), ("../escape", F, "escaped\n")]);
        let err = result.unwrap_err();
        assert!(matches!(err, UnpackError::Escape { .. }), "{err}");
        assert!(err.to_string().contains("../escape"), "{err}");
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn a_path_through_a_symlink_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().display().to_string();
        let (dir, result) = unpack_into(&[("evil", S, &target), ("evil/marker", F, "x")]);
        let err = result.unwrap_err();
        assert!(err.to_string().contains("through a symlink"), "{err}");
        assert!(!outside.path().join("marker").exists());
        drop(dir);
    }

    #[test]
    fn a_hard_link_out_of_the_layer_is_refused() {
        let (_dir, result) = unpack_into(&[("x", H, "../../etc/passwd")]);
        assert!(matches!(result.unwrap_err(), UnpackError::Escape { .. }));
        let (_dir, result) = unpack_into(&[("l", S, "/etc"), ("x", H, "l/passwd")]);
        assert!(matches!(result.unwrap_err(), UnpackError::Escape { .. }));
    }

    #[test]
    fn only_harmless_xattrs_are_kept() {
        assert!(xattr_allowed(b"security.capability"));
        assert!(xattr_allowed(b"user.mime"));
        assert!(!xattr_allowed(b"trusted.overlay.redirect"));
        assert!(!xattr_allowed(b"security.selinux"));
    }
}

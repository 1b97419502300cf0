//! The container's filesystem view, built by its init in its new mount namespace: rootfs,
//! OCI mounts, /dev, pivot_root, read-only root, masked and read-only paths.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mkdirat, mknod, Mode, SFlag};
use nix::sys::statvfs::FsFlags;
use oci_spec::runtime::{LinuxDeviceType, Mount, Spec};

use super::spec::join_under;

type Result<T> = std::result::Result<T, String>;

fn errno(what: &str, path: &Path, err: impl std::fmt::Display) -> String {
    format!("{what} {}: {err}", path.display())
}

/// Everything before pivot_root, with `rootfs` the guest path of the container's root.
/// `userns`: we are in the container's new user namespace, where device nodes cannot be
/// made (they are bound from the guest's /dev instead) and sysfs can be mounted only with a
/// network namespace of its own (else the guest's /sys is bound), as runc does.
pub fn prepare_rootfs(spec: &Spec, rootfs: &Path, userns: bool) -> Result<()> {
    let propagation = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone())
        .unwrap_or_else(|| "rslave".into());
    let (prop_flags, _) = parse_options(&[propagation]);
    let prop_flags = if prop_flags.is_empty() {
        MsFlags::MS_SLAVE | MsFlags::MS_REC
    } else {
        prop_flags
    };
    // Nothing we mount may leak back into the agent's namespace.
    mount(None::<&str>, "/", None::<&str>, prop_flags, None::<&str>)
        .map_err(|err| errno("cannot set propagation of", Path::new("/"), err))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|err| errno("cannot bind the rootfs", rootfs, err))?;

    let mut dev_is_ours = false;
    for m in spec.mounts().iter().flatten() {
        mount_one(rootfs, m, userns)?;
        if m.destination() == Path::new("/dev") {
            dev_is_ours = true;
        }
    }
    if dev_is_ours {
        populate_dev(spec, rootfs, userns)?;
    }
    Ok(())
}

/// Makes the missing targets of the spec's bind mounts in `rootfs`, as the guest's root,
/// before the container process exists. Inside a user namespace of its own the container's
/// root often may not write where a target goes (an image's `/etc` belongs to the host's
/// root), which is why docker and podman make `/etc/hosts` and friends in the root
/// filesystem beforehand. Every path is resolved inside `rootfs` (`openat2` with
/// `RESOLVE_IN_ROOT`, one component at a time), so a symlink in the image cannot make the
/// agent create anything outside it. A target under an earlier mount of the spec (a bind
/// into `/dev`, say) is left to the container, which makes it on that mount, and so is one
/// this cannot make (a parent that is a dangling symlink): the container tries as before.
pub fn create_bind_targets(spec: &Spec, rootfs: &Path) -> Result<()> {
    let root = nix::fcntl::open(
        rootfs,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| errno("cannot open", rootfs, err))?;
    let mounts: Vec<&Mount> = spec.mounts().iter().flatten().collect();
    for (i, m) in mounts.iter().enumerate() {
        let (flags, _) = parse_options(&m.options().clone().unwrap_or_default());
        let is_bind = m.typ().as_deref() == Some("bind") || flags.contains(MsFlags::MS_BIND);
        let dest = m.destination();
        let under_earlier = mounts[..i].iter().any(|earlier| {
            dest != earlier.destination() && dest.starts_with(earlier.destination())
        });
        if !is_bind || under_earlier {
            continue;
        }
        // A destination with `..` is refused when the container mounts it.
        let Ok(relative) = join_under(Path::new(""), dest) else {
            continue;
        };
        let source_is_dir = m.source().as_ref().is_some_and(|s| s.is_dir());
        if let Err(err) = create_in_root(&root, &relative, source_is_dir) {
            crate::debug!(
                "mount target {} left to the container: {err}",
                dest.display()
            );
        }
    }
    Ok(())
}

/// Opens `relative` resolved inside the root `root` (absolute symlinks and `..` stay in it).
fn open_in_root(root: &OwnedFd, relative: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let path = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    nix::fcntl::openat2(
        root,
        path,
        OpenHow::new()
            .flags(flags | OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS),
    )
}

/// Makes `relative` (a directory if `dir`, else an empty file) and its missing parents under
/// `root`. Whatever is there already is kept.
fn create_in_root(root: &OwnedFd, relative: &Path, dir: bool) -> nix::Result<()> {
    match open_in_root(root, relative, OFlag::empty()) {
        Err(Errno::ENOENT) => {}
        other => return other.map(drop),
    }
    let Some(name) = relative.file_name() else {
        return Ok(());
    };
    let mut parent = PathBuf::new();
    let mut parent_fd = open_in_root(root, &parent, OFlag::O_DIRECTORY)?;
    for component in relative.parent().into_iter().flat_map(Path::components) {
        parent.push(component);
        parent_fd = match open_in_root(root, &parent, OFlag::O_DIRECTORY) {
            Err(Errno::ENOENT) => {
                // One name in a directory already resolved inside the root: mkdir never
                // follows a symlink in its last component.
                match mkdirat(
                    &parent_fd,
                    component.as_os_str(),
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(err) => return Err(err),
                }
                open_in_root(root, &parent, OFlag::O_DIRECTORY)?
            }
            other => other?,
        };
    }
    let made = if dir {
        mkdirat(&parent_fd, name, Mode::from_bits_truncate(0o755))
    } else {
        nix::fcntl::openat(
            &parent_fd,
            name,
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map(drop)
    };
    match made {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(err) => Err(err),
    }
}

fn mount_one(rootfs: &Path, m: &Mount, userns: bool) -> Result<()> {
    let dest = join_under(rootfs, m.destination()).map_err(|err| err.to_string())?;
    let options = m.options().clone().unwrap_or_default();
    let (flags, data) = parse_options(&options);
    let typ = m.typ().clone().unwrap_or_default();
    let is_bind = typ == "bind" || flags.contains(MsFlags::MS_BIND);
    let source = m.source().clone().unwrap_or_else(|| PathBuf::from(&typ));

    if is_bind {
        // A file is bound onto a file, a directory onto a directory.
        if source.is_dir() {
            fs::create_dir_all(&dest).map_err(|err| errno("cannot create", &dest, err))?;
        } else if !dest.exists() {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(|err| errno("cannot create", parent, err))?;
            }
            fs::write(&dest, b"").map_err(|err| errno("cannot create", &dest, err))?;
        }
        let bind_flags = MsFlags::MS_BIND | (flags & MsFlags::MS_REC);
        mount(Some(&source), &dest, None::<&str>, bind_flags, None::<&str>).map_err(|err| {
            format!(
                "cannot bind {} on {}: {err}",
                source.display(),
                m.destination().display()
            )
        })?;
        let extra = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | propagation_flags());
        if !extra.is_empty() {
            remount_bind(&dest, extra)
                .map_err(|err| errno("cannot remount", m.destination(), err))?;
        }
    } else {
        fs::create_dir_all(&dest).map_err(|err| errno("cannot create", &dest, err))?;
        // cgroup v1 does not exist in the guest: give the container the v2 hierarchy.
        let fstype = if typ == "cgroup" {
            "cgroup2"
        } else {
            typ.as_str()
        };
        let data = if fstype == "cgroup2" {
            String::new()
        } else {
            data
        };
        let mount_flags = flags & !propagation_flags();
        let result = mount(
            Some(&source),
            &dest,
            Some(fstype),
            mount_flags,
            (!data.is_empty()).then_some(data.as_str()),
        );
        match result {
            Ok(()) => {}
            // A sysfs or cgroup2 that this kernel will not mount here is not fatal (runc
            // behaves the same in rootless setups); anything else is.
            Err(err) if matches!(fstype, "cgroup2" | "mqueue") && err == Errno::EPERM => {
                crate::warn!("skipping {fstype} on {}: {err}", m.destination().display());
            }
            // In a user namespace sharing the guest's network namespace, /sys is the guest's
            // bound whole (see below), with the guest's cgroup2 on /sys/fs/cgroup already:
            // the same superblock again is EBUSY, and the bound one cannot be unmounted (it
            // is locked to the user namespace). The container keeps that view: the guest's
            // whole hierarchy, whose files its unmapped root cannot write.
            Err(Errno::EBUSY) if fstype == "cgroup2" && userns => {
                crate::warn!(
                    "{} keeps the guest's cgroup2 bound with /sys (a user namespace without a network namespace of its own)",
                    m.destination().display()
                );
            }
            // A user namespace may mount sysfs only together with a network namespace of
            // its own; without one, bind the guest's /sys (runc does the same).
            Err(Errno::EPERM) if fstype == "sysfs" && userns => {
                mount(
                    Some("/sys"),
                    &dest,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|err| errno("cannot bind the guest's /sys on", m.destination(), err))?;
                let extra = mount_flags & !MsFlags::MS_REMOUNT;
                if !extra.is_empty() {
                    remount_bind(&dest, extra)
                        .map_err(|err| errno("cannot remount", m.destination(), err))?;
                }
            }
            Err(err) => {
                return Err(format!(
                    "cannot mount {fstype} on {}: {err}",
                    m.destination().display()
                ))
            }
        }
    }
    let propagation = flags & propagation_flags();
    if !propagation.is_empty() {
        mount(None::<&str>, &dest, None::<&str>, propagation, None::<&str>)
            .map_err(|err| errno("cannot set propagation of", m.destination(), err))?;
    }
    Ok(())
}

fn propagation_flags() -> MsFlags {
    MsFlags::MS_SHARED | MsFlags::MS_PRIVATE | MsFlags::MS_SLAVE | MsFlags::MS_UNBINDABLE
}

/// Splits OCI mount options into flags and the filesystem's data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" => (MsFlags::MS_PRIVATE, MsFlags::empty()),
            "rprivate" => (MsFlags::MS_PRIVATE | MsFlags::MS_REC, MsFlags::empty()),
            "shared" => (MsFlags::MS_SHARED, MsFlags::empty()),
            "rshared" => (MsFlags::MS_SHARED | MsFlags::MS_REC, MsFlags::empty()),
            "slave" => (MsFlags::MS_SLAVE, MsFlags::empty()),
            "rslave" => (MsFlags::MS_SLAVE | MsFlags::MS_REC, MsFlags::empty()),
            "unbindable" => (MsFlags::MS_UNBINDABLE, MsFlags::empty()),
            "runbindable" => (MsFlags::MS_UNBINDABLE | MsFlags::MS_REC, MsFlags::empty()),
            // Docker/containerd hints with no kernel meaning.
            "tmpcopyup" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_string());
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, data.join(","))
}

/// `MS_BIND | MS_REMOUNT` of `path` with `flags`. In a user namespace the kernel refuses to
/// clear the flags of a mount that were locked when the mount namespace was copied
/// (nosuid, nodev, noexec, atime, read-only): on EPERM, again with the flags the mount has.
fn remount_bind(path: &Path, flags: MsFlags) -> nix::Result<()> {
    let remount = |flags: MsFlags| {
        mount(
            None::<&str>,
            path,
            None::<&str>,
            flags | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
    };
    match remount(flags) {
        Err(Errno::EPERM) => {
            let current = nix::sys::statvfs::statvfs(path)?.flags();
            remount(flags | locked_flags(current))
        }
        other => other,
    }
}

/// The mount flags of `current` that a user namespace cannot clear.
fn locked_flags(current: FsFlags) -> MsFlags {
    // ST_RELATIME (Linux's statfs flag 0x1000), which nix names on glibc only.
    const ST_RELATIME: libc::c_ulong = 0x1000;
    let mut flags = MsFlags::empty();
    for (st, ms) in [
        (FsFlags::ST_RDONLY.bits(), MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID.bits(), MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV.bits(), MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC.bits(), MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME.bits(), MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME.bits(), MsFlags::MS_NODIRATIME),
        (ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.bits() & st != 0 {
            flags |= ms;
        }
    }
    flags
}

/// Default device nodes, spec devices and the usual /dev symlinks in a fresh /dev. In a
/// user namespace, where mknod is refused, each node is bound from the guest's /dev path of
/// the same name instead, as runc does.
fn populate_dev(spec: &Spec, rootfs: &Path, userns: bool) -> Result<()> {
    let dev = rootfs.join("dev");
    let defaults: [(&str, u64, u64); 6] = [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ];
    for (name, major, minor) in defaults {
        if userns {
            bind_device(&Path::new("/dev").join(name), &dev.join(name))?;
        } else {
            make_node(&dev.join(name), SFlag::S_IFCHR, major, minor, 0o666, None)?;
        }
    }
    for device in spec
        .linux()
        .as_ref()
        .and_then(|l| l.devices().clone())
        .unwrap_or_default()
    {
        let path = join_under(rootfs, device.path()).map_err(|err| err.to_string())?;
        if userns {
            bind_device(device.path(), &path)?;
            continue;
        }
        let kind = match device.typ() {
            LinuxDeviceType::B => SFlag::S_IFBLK,
            LinuxDeviceType::P => SFlag::S_IFIFO,
            _ => SFlag::S_IFCHR,
        };
        let major = u64::try_from(device.major()).unwrap_or(0);
        let minor = u64::try_from(device.minor()).unwrap_or(0);
        make_node(
            &path,
            kind,
            major,
            minor,
            device.file_mode().unwrap_or(0o666),
            device.uid().zip(device.gid()),
        )?;
    }
    for dir in ["pts", "shm"] {
        let _ = fs::create_dir(dev.join(dir));
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        let path = dev.join(name);
        match symlink(target, &path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(errno("cannot create", &path, err)),
        }
    }
    if Path::new("/proc/kcore").exists() {
        let _ = symlink("/proc/kcore", dev.join("core"));
    }
    Ok(())
}

/// Binds the guest's device node `source` on `dest` (an empty file made for it).
fn bind_device(source: &Path, dest: &Path) -> Result<()> {
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent).map_err(|err| errno("cannot create", parent, err))?;
    }
    if !dest.exists() {
        fs::write(dest, b"").map_err(|err| errno("cannot create", dest, err))?;
    }
    mount(
        Some(source),
        dest,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|err| {
        format!(
            "cannot bind the guest's {} on {} (device nodes cannot be created in a user \
             namespace, so they are bound from the guest): {err}",
            source.display(),
            dest.display()
        )
    })
}

fn make_node(
    path: &Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|err| errno("cannot create", parent, err))?;
    }
    match mknod(
        path,
        kind,
        Mode::from_bits_truncate(mode & 0o7777),
        makedev(major, minor),
    ) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(err) => return Err(errno("cannot create device", path, err)),
    }
    // mknod applies the umask; set the exact mode.
    let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777));
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
    }
    Ok(())
}

/// Makes `rootfs` the root with pivot_root. The agent leaves the initramfs at boot (see
/// `pid1::leave_initramfs`), so pivot_root works; if it still fails with EINVAL (the root
/// is the initramfs after all), the last resort is moving the rootfs onto / and chroot, like
/// `runc --no-pivot`, which CAP_SYS_CHROOT can escape: logged.
pub fn enter_rootfs(rootfs: &Path) -> Result<()> {
    use nix::fcntl::{open, OFlag};
    let oldroot = open("/", OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty())
        .map_err(|err| errno("cannot open", Path::new("/"), err))?;
    let newroot = open(rootfs, OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty())
        .map_err(|err| errno("cannot open", rootfs, err))?;
    nix::unistd::fchdir(&newroot).map_err(|err| errno("cannot chdir to", rootfs, err))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            nix::unistd::fchdir(&oldroot).map_err(|err| format!("cannot chdir: {err}"))?;
            mount(
                None::<&str>,
                ".",
                None::<&str>,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|err| format!("cannot make the old root a slave: {err}"))?;
            umount2(".", MntFlags::MNT_DETACH)
                .map_err(|err| format!("cannot unmount the old root: {err}"))?;
        }
        Err(Errno::EINVAL) => {
            crate::warn!(
                "pivot_root to {} failed with EINVAL (root is the initramfs?); falling back \
                 to move-mount + chroot",
                rootfs.display()
            );
            mount(
                Some(rootfs),
                "/",
                None::<&str>,
                MsFlags::MS_MOVE,
                None::<&str>,
            )
            .map_err(|err| errno("cannot move the rootfs onto / from", rootfs, err))?;
            nix::unistd::chroot(".").map_err(|err| format!("cannot chroot: {err}"))?;
        }
        Err(err) => return Err(errno("pivot_root to", rootfs, err)),
    }
    nix::unistd::chdir("/").map_err(|err| format!("cannot chdir to /: {err}"))
}

/// Binds the terminal's slave (`/dev/pts/N` of the container's devpts) on `/dev/console`,
/// as runc does; after entering the rootfs. Skipped when the container has no /dev.
pub fn bind_console(slave: &Path) -> Result<()> {
    let target = Path::new("/dev/console");
    if !Path::new("/dev").is_dir() {
        return Ok(());
    }
    if !target.exists() {
        fs::write(target, b"").map_err(|err| errno("cannot create", target, err))?;
    }
    mount(
        Some(slave),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|err| errno("cannot bind the console on", target, err))
}

/// After entering the rootfs: read-only root, masked and read-only paths.
pub fn finish(spec: &Spec) -> Result<()> {
    let linux = spec.linux().as_ref();
    for path in linux
        .and_then(|l| l.masked_paths().as_ref())
        .into_iter()
        .flatten()
    {
        mask(Path::new(path))?;
    }
    for path in linux
        .and_then(|l| l.readonly_paths().as_ref())
        .into_iter()
        .flatten()
    {
        make_readonly(Path::new(path))?;
    }
    if spec.root().as_ref().and_then(|r| r.readonly()) == Some(true) {
        remount_bind(Path::new("/"), MsFlags::MS_RDONLY)
            .map_err(|err| format!("cannot make the root read-only: {err}"))?;
    }
    Ok(())
}

fn mask(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    match result {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(err) => Err(errno("cannot mask", path, err)),
    }
}

fn make_readonly(path: &Path) -> Result<()> {
    match mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    ) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(()),
        Err(err) => return Err(errno("cannot bind", path, err)),
    }
    remount_bind(path, MsFlags::MS_RDONLY | MsFlags::MS_REC)
        .map_err(|err| errno("cannot make read-only", path, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mount_option_brig_features_lists_is_a_flag_here() {
        for option in brig_protocols::features::MOUNT_OPTIONS {
            let (_, data) = parse_options(&[option.to_string()]);
            assert_eq!(data, "", "{option} would go to the filesystem as data");
        }
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let options: Vec<String> = ["nosuid", "strictatime", "mode=755", "size=65536k", "ro"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = parse_options(&options);
        assert!(flags.contains(MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME | MsFlags::MS_RDONLY));
        assert_eq!(data, "mode=755,size=65536k");
    }

    fn spec_with_mounts(mounts: &str) -> Spec {
        serde_json::from_str(&format!(r#"{{"ociVersion":"1.0.2","mounts":{mounts}}}"#)).unwrap()
    }

    #[test]
    fn bind_targets_are_made_inside_the_root_whatever_its_symlinks_say() {
        let dir = std::env::temp_dir().join(format!("brig-targets-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (rootfs, outside, source_dir) =
            (dir.join("rootfs"), dir.join("outside"), dir.join("src"));
        for d in [&rootfs, &outside, &source_dir] {
            fs::create_dir_all(d).unwrap();
        }
        fs::create_dir(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/kept"), b"image's").unwrap();
        // An image whose /run points out of the root absolutely, and /etc/up by dots (both
        // would land in `outside` if followed on the host); inside the root, the absolute
        // one names a directory of the image.
        symlink(&outside, rootfs.join("run")).unwrap();
        let in_root = rootfs.join(outside.strip_prefix("/").unwrap());
        fs::create_dir_all(&in_root).unwrap();
        symlink("../../outside", rootfs.join("etc/up")).unwrap();
        fs::create_dir(rootfs.join("outside")).unwrap();
        // A dangling one is left to the container.
        symlink("/nowhere", rootfs.join("gone")).unwrap();
        let file = dir.join("file");
        fs::write(&file, b"x").unwrap();
        let (file, source_dir) = (file.display(), source_dir.display());
        let spec = spec_with_mounts(&format!(
            r#"[{{"destination":"/etc/hosts","type":"bind","source":"{file}","options":["rbind","ro"]}},
               {{"destination":"/etc/kept","type":"bind","source":"{file}"}},
               {{"destination":"/data/deep/dir","type":"none","source":"{source_dir}","options":["bind"]}},
               {{"destination":"/run/x","type":"bind","source":"{file}"}},
               {{"destination":"/etc/up/y","type":"bind","source":"{file}"}},
               {{"destination":"/gone/z","type":"bind","source":"{file}"}},
               {{"destination":"/dev","type":"tmpfs","source":"tmpfs"}},
               {{"destination":"/dev/termination-log","type":"bind","source":"{file}"}},
               {{"destination":"/proc","type":"proc","source":"proc"}}]"#
        ));
        create_bind_targets(&spec, &rootfs).unwrap();
        assert_eq!(fs::read(rootfs.join("etc/hosts")).unwrap(), b"");
        assert_eq!(fs::read(rootfs.join("etc/kept")).unwrap(), b"image's");
        assert!(rootfs.join("data/deep/dir").is_dir());
        // The symlinks were followed inside the root only.
        assert!(in_root.join("x").is_file());
        assert!(!rootfs.join("nowhere").exists());
        assert!(rootfs.join("outside/y").is_file());
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "made outside the root"
        );
        // Under another mount (the container's /dev tmpfs) and not binds: not made here.
        assert!(!rootfs.join("dev").exists());
        assert!(!rootfs.join("proc").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}

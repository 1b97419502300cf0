//! What only PID 1 does: mount the guest's filesystems, set up cgroup v2, set the hostname,
//! and power the guest off.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// One filesystem to mount.
struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
    /// Without it the agent cannot work: fail boot.
    required: bool,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The guest's filesystems, in mount order.
const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: true,
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: true,
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        required: true,
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
        required: false,
    },
    Mount {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        required: false,
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        required: false,
    },
    Mount {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: false,
    },
];

/// Where the tmpfs that replaces the initramfs as the root is assembled.
const NEW_ROOT: &str = "/newroot";
/// statfs f_type of ramfs (the initramfs without CONFIG_TMPFS).
const RAMFS_MAGIC: i128 = 0x8584_58f6;

/// If `/` is the initramfs (rootfs, the root of the mount tree, which `pivot_root` cannot
/// leave: EINVAL), moves the guest onto a tmpfs root, the way `switch_root` does: a tmpfs at
/// /newroot, moved onto `/`, then `chroot(".")`. Afterwards `/` is a mount with a parent, so
/// containers get a real `pivot_root`. Must run first, before anything is mounted.
///
/// The agent keeps running from the binary in the initramfs (it stays mapped; re-executing
/// a copy would cost boot time and, with the original still mapped, memory); container
/// inits are started from `/proc/self/exe`, which works from any root.
///
/// Returns whether it switched.
pub fn leave_initramfs() -> anyhow::Result<bool> {
    let root = nix::sys::statfs::statfs("/").context("cannot statfs /")?;
    let kind = root.filesystem_type();
    if kind != nix::sys::statfs::TMPFS_MAGIC && i128::from(kind.0) != RAMFS_MAGIC {
        return Ok(false);
    }
    fs::create_dir_all(NEW_ROOT).with_context(|| format!("cannot create {NEW_ROOT}"))?;
    mount(
        Some("tmpfs"),
        NEW_ROOT,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .with_context(|| format!("cannot mount a tmpfs on {NEW_ROOT}"))?;
    nix::unistd::chdir(NEW_ROOT).with_context(|| format!("cannot chdir to {NEW_ROOT}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("cannot move the new root onto /")?;
    nix::unistd::chroot(".").context("cannot chroot into the new root")?;
    nix::unistd::chdir("/").context("cannot chdir to the new /")?;
    Ok(true)
}

/// Mounts everything; returns an error only if a required filesystem could not be mounted.
/// Optional failures are logged.
pub fn mount_filesystems() -> anyhow::Result<()> {
    for m in MOUNTS {
        match mount_one(m) {
            Ok(()) => crate::debug!("mounted {} on {}", m.fstype, m.target),
            Err(err) if m.required => return Err(err),
            Err(err) => crate::error!("{err:#} (continuing without it)"),
        }
    }
    Ok(())
}

fn mount_one(m: &Mount) -> anyhow::Result<()> {
    fs::create_dir_all(m.target)
        .with_context(|| format!("cannot create mount point {}", m.target))?;
    match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
        Ok(()) => Ok(()),
        // Already mounted (e.g. the kernel mounted devtmpfs itself).
        Err(Errno::EBUSY) => {
            crate::debug!("{} already mounted on {}", m.fstype, m.target);
            Ok(())
        }
        Err(errno) => bail!("cannot mount {} on {}: {errno}", m.fstype, m.target),
    }
}

/// The small things a Linux userland expects in /dev and /tmp. Best effort, logged.
pub fn populate_dev_and_tmp() {
    // With a private devpts instance, /dev/ptmx must point into it.
    let ptmx = Path::new("/dev/ptmx");
    if Path::new("/dev/pts/ptmx").exists()
        && !ptmx.is_symlink()
        && fs::remove_file(ptmx).or_else(ignore_not_found).is_ok()
    {
        log_failure("link /dev/ptmx", symlink("pts/ptmx", ptmx));
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() && !Path::new(link).is_symlink() {
            log_failure(&format!("link {link}"), symlink(target, link));
        }
    }
    log_failure(
        "create /tmp",
        fs::create_dir_all("/tmp")
            .and_then(|()| fs::set_permissions("/tmp", fs::Permissions::from_mode(0o1777))),
    );
}

fn ignore_not_found(err: std::io::Error) -> std::io::Result<()> {
    if err.kind() == ErrorKind::NotFound {
        Ok(())
    } else {
        Err(err)
    }
}

fn log_failure(what: &str, result: std::io::Result<()>) {
    if let Err(err) = result {
        crate::warn!("cannot {what}: {err}");
    }
}

/// Enables every controller of the root cgroup for its children, one by one so that one
/// refused controller does not stop the others. Best effort.
pub fn enable_cgroup_controllers() {
    let root = Path::new("/sys/fs/cgroup");
    let available = match fs::read_to_string(root.join("cgroup.controllers")) {
        Ok(text) => text,
        Err(err) => {
            crate::warn!("cgroup v2 controllers unavailable: {err}");
            return;
        }
    };
    let mut enabled = Vec::new();
    for controller in available.split_whitespace() {
        match fs::write(
            root.join("cgroup.subtree_control"),
            format!("+{controller}"),
        ) {
            Ok(()) => enabled.push(controller),
            Err(err) => crate::warn!("cannot enable cgroup controller {controller}: {err}"),
        }
    }
    crate::debug!("cgroup controllers enabled: {}", enabled.join(" "));
}

/// Sets the guest hostname.
pub fn set_hostname(name: &str) {
    match nix::unistd::sethostname(name) {
        Ok(()) => crate::debug!("hostname set to {name}"),
        Err(err) => crate::error!("cannot set hostname {name:?}: {err}"),
    }
}

/// Syncs filesystems and resets the guest. With `reboot=k` the VM resets, which the VMM
/// treats as power-off. Never returns: if reboot fails, there is nothing left to do but wait.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).err();
    crate::error!("reboot failed ({err:?}); halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Readahead of the share, KiB. FUSE starts with the kernel's 128 KiB, so a sequential
/// read of a file costs one round trip to the VMM per 128 KiB; the VMM accepts 1 MiB
/// requests, and a larger window keeps several in flight.
const SHARE_READAHEAD_KIB: u32 = 4096;

/// Raise the readahead of the file system mounted at `target` (its backing device info is
/// /sys/class/bdi/MAJOR:MINOR). Best effort: reads only get slower without it.
fn widen_readahead(target: &str) {
    let dev = match nix::sys::stat::stat(target) {
        Ok(st) => st.st_dev,
        Err(err) => return crate::debug!("cannot stat {target}: {err}"),
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    if let Err(err) = fs::write(&path, SHARE_READAHEAD_KIB.to_string()) {
        crate::debug!("cannot set {path}: {err}");
    }
}

/// Mounts the sandbox's virtio-fs share `tag` at /run/brig/shared. Returns the problem, if
/// any, for CreateContainer to report.
pub fn mount_share(tag: Option<&str>) -> Option<String> {
    let target = crate::container::SHARED_DIR;
    let Some(tag) = tag else {
        return Some("the kernel command line has no brig.share=TAG".into());
    };
    if let Err(err) = fs::create_dir_all(target) {
        let problem = format!("cannot create {target}: {err}");
        crate::error!("{problem}");
        return Some(problem);
    }
    match mount(
        Some(tag),
        target,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => {
            crate::debug!("mounted virtiofs {tag} on {target}");
            widen_readahead(target);
            None
        }
        Err(errno) => {
            let problem = format!("cannot mount virtiofs tag {tag:?} on {target}: {errno}");
            crate::error!("{problem}");
            Some(problem)
        }
    }
}

//! What a microVM is made of: the configuration `brig-vmm` is started with.

use std::path::PathBuf;

use crate::arch::layout::{MAX_VCPUS, MEM_MAX_MIB, MEM_MIN_MIB};

/// Kernel command line used when none is given: console on COM1, reset through the i8042
/// on reboot (which ends the VMM), reboot at once on panic (which the VMM reports).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule quiet";

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The VMM's stdout.
    Stdout,
    /// Appended to a file (created if missing) that never grows past `limit` bytes: the
    /// newest part is kept (see `console_file`).
    File {
        /// The file.
        path: PathBuf,
        /// Its cap in bytes.
        limit: u64,
    },
    /// Discarded.
    Off,
}

/// The vsock device: guest CID and the host Unix socket of the hybrid backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// Guest context ID (3 or more).
    pub guest_cid: u64,
    /// Host-side Unix socket: host connects here with `CONNECT <port>\n`; guest-initiated
    /// connections to port P go to `<uds>_<P>`.
    pub uds: PathBuf,
}

/// A virtio-fs share: a host directory the guest mounts with `mount -t virtiofs TAG DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// Mount tag (at most 36 bytes).
    pub tag: String,
    /// The host directory; nothing outside it is reachable from the guest.
    pub shared_dir: PathBuf,
    /// What the guest may cache.
    pub cache: FsCache,
}

/// What the guest may cache of a virtio-fs share (virtiofsd's `--cache` modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum FsCache {
    /// File data in the guest's page cache, checked again at each open (mmap works fully).
    #[default]
    Auto,
    /// Only metadata and directories cached; file data goes to the host on every read and
    /// write (direct I/O: fastest for large sequential I/O, but a guest kernel before 6.6
    /// refuses `MAP_SHARED` mappings of such files).
    Metadata,
    /// Nothing cached: every access asks the host.
    Never,
    /// Everything cached for long (the host must not change the files behind the guest).
    Always,
}

/// A microVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Uncompressed ELF `vmlinux` with a PVH entry note.
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed) handed to the kernel.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (virtio-mmio device declarations are appended).
    pub cmdline: String,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Where the guest console goes.
    pub console: ConsoleTarget,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The virtio-fs share, if any.
    pub fs: Option<FsConfig>,
    /// Per-thread system call filters.
    pub seccomp: crate::seccomp::SeccompMode,
    /// Move into a mount namespace whose root is the sandbox directory (see `confine`).
    pub confine: bool,
}

/// A configuration that cannot boot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--cpus {0} is out of range: use 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    /// Memory size out of range.
    #[error("--memory {0} MiB is out of range: use {MEM_MIN_MIB} to {MEM_MAX_MIB} MiB")]
    Memory(u64),
    /// The kernel file does not exist.
    #[error("kernel {0} does not exist: pass the guest vmlinux with --kernel")]
    KernelMissing(PathBuf),
    /// The initrd file does not exist.
    #[error("initrd {0} does not exist")]
    InitrdMissing(PathBuf),
    /// A reserved vsock CID.
    #[error("--vsock-cid {0} is reserved: use 3 or more")]
    VsockCid(u64),
    /// The vsock socket path is taken.
    #[error("vsock socket {0} already exists: another VMM may be using it, or a stale one was left behind (remove it)")]
    VsockPathInUse(PathBuf),
    /// The shared directory does not exist.
    #[error("--fs: shared directory {0} does not exist or is not a directory")]
    FsDir(PathBuf),
    /// With confinement the VMM sees only one directory; the share is not in it.
    #[error("--fs directory {0} is not inside {1}, the directory of --vsock-uds: confined, the VMM sees only that directory (put the share there, or pass --no-confine)")]
    OutsideRoot(PathBuf, PathBuf),
    /// The console file cannot be opened.
    #[error("cannot open console file {path}: {reason}")]
    ConsoleFile { path: PathBuf, reason: String },
}

impl VmConfig {
    /// The directory that becomes the confined VMM's root: the one holding the vsock socket
    /// (guest connections go to sockets next to it), else the share; canonical.
    pub fn confinement_root(&self) -> Option<PathBuf> {
        let dir = match (&self.vsock, &self.fs) {
            (Some(vsock), _) => vsock
                .uds
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new(".")),
            (None, Some(fs)) => fs.shared_dir.as_path(),
            (None, None) => return None,
        };
        std::fs::canonicalize(dir).ok()
    }

    /// Check everything that can be checked before touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus.into()));
        }
        if !(MEM_MIN_MIB..=MEM_MAX_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::Memory(self.mem_mib));
        }
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 || vsock.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(vsock.guest_cid));
            }
            if vsock.uds.symlink_metadata().is_ok() {
                return Err(ConfigError::VsockPathInUse(vsock.uds.clone()));
            }
        }
        if let Some(fs) = &self.fs {
            if !fs.shared_dir.is_dir() {
                return Err(ConfigError::FsDir(fs.shared_dir.clone()));
            }
            if let (true, Some(root)) = (self.confine, self.confinement_root()) {
                let dir = std::fs::canonicalize(&fs.shared_dir)
                    .map_err(|_| ConfigError::FsDir(fs.shared_dir.clone()))?;
                if !dir.starts_with(&root) {
                    return Err(ConfigError::OutsideRoot(fs.shared_dir.clone(), root));
                }
            }
        }
        Ok(())
    }
}

/// Parse `TAG=DIR` (the `--fs` flag).
pub fn parse_fs(s: &str) -> Result<FsConfig, String> {
    match s.split_once('=') {
        Some((tag, dir)) if !tag.is_empty() && tag.len() <= 36 && !dir.is_empty() => Ok(FsConfig {
            tag: tag.to_string(),
            shared_dir: dir.into(),
            cache: FsCache::Auto,
        }),
        _ => Err(format!(
            "'{s}' is not TAG=DIR (a tag of 1 to 36 bytes, then the host directory)"
        )),
    }
}

/// Parse a memory size: `256`, `256M`, `256MiB`, `1G`, `1GiB` (plain numbers are MiB).
pub fn parse_mem_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a memory size (try 256M or 1G)"))?;
    let mib = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => Some(n),
        "g" | "gb" | "gib" => n.checked_mul(1024),
        _ => None,
    };
    mib.ok_or_else(|| format!("'{s}' is not a memory size (try 256M or 1G)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 1,
            mem_mib: 256,
            console: ConsoleTarget::Off,
            vsock: None,
            fs: None,
            seccomp: crate::seccomp::SeccompMode::Enforce,
            confine: true,
        }
    }

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_mem_mib("256"), Ok(256));
        assert_eq!(parse_mem_mib("256M"), Ok(256));
        assert_eq!(parse_mem_mib("1G"), Ok(1024));
        assert_eq!(parse_mem_mib("2GiB"), Ok(2048));
        assert!(parse_mem_mib("lots").is_err());
        assert!(parse_mem_mib("12T").is_err());
        assert!(parse_mem_mib("99999999999999999999G").is_err());
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let exe = std::env::current_exe().unwrap();
        assert_eq!(config(exe.clone()).validate(), Ok(()));
        let mut c = config(exe.clone());
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c = config(exe.clone());
        c.mem_mib = 8;
        assert_eq!(c.validate(), Err(ConfigError::Memory(8)));
        c.mem_mib = 1 << 20;
        assert_eq!(c.validate(), Err(ConfigError::Memory(1 << 20)));
        c = config("/nonexistent/vmlinux".into());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/vmlinux"));
        c = config(exe.clone());
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds: "/nonexistent/v.sock".into(),
        });
        assert_eq!(c.validate(), Err(ConfigError::VsockCid(2)));
        c.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds: exe.clone(),
        });
        assert_eq!(c.validate(), Err(ConfigError::VsockPathInUse(exe.clone())));
        c = config(exe.clone());
        c.fs = Some(FsConfig {
            tag: "brig".into(),
            shared_dir: exe.clone(),
            cache: FsCache::Auto,
        });
        assert_eq!(c.validate(), Err(ConfigError::FsDir(exe)));
    }

    #[test]
    fn fs_flags_parse() {
        assert_eq!(
            parse_fs("brig=/run/x"),
            Ok(FsConfig {
                tag: "brig".into(),
                shared_dir: "/run/x".into(),
                cache: FsCache::Auto
            })
        );
        assert!(parse_fs("nodir").is_err());
        assert!(parse_fs("=/x").is_err());
        assert!(parse_fs(&format!("{}=/x", "t".repeat(37))).is_err());
    }
}

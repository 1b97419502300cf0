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

/// Where the net device's frames go: a TAP, inherited or opened by the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A TAP descriptor the parent opened (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and left
    /// open across exec.
    Fd(i32),
    /// A TAP by name, attached to (or created) in the VMM's network namespace.
    Tap(String),
}

/// The virtio-net device: its TAP, the guest's MAC address and, optionally, the MTU the
/// guest is told (the TAP's own MTU is the caller's to set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP.
    pub backend: NetBackend,
    /// The guest interface's MAC address (unicast, not all zeros).
    pub mac: [u8; 6],
    /// MTU announced to the guest (`VIRTIO_NET_F_MTU`), 68 to 65535.
    pub mtu: Option<u16>,
    /// Offer checksum and segmentation offloads (`offload=on`, the default) or not.
    pub offload: bool,
}

/// Smallest MTU `--net mtu=` takes (IPv4's minimum).
pub const NET_MIN_MTU: u32 = 68;

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
    /// Back guest memory with transparent huge pages (faster, but the host pays 2 MiB for
    /// each range the guest touches); by default never.
    pub thp: bool,
    /// Add a balloon device that takes the guest's free page reports and gives the host the
    /// memory behind them back.
    pub free_page_reporting: bool,
    /// Where the guest console goes.
    pub console: ConsoleTarget,
    /// The vsock device, if any.
    pub vsock: Option<VsockConfig>,
    /// The virtio-fs share, if any.
    pub fs: Option<FsConfig>,
    /// The virtio-net device, if any.
    pub net: Option<NetConfig>,
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
    /// A `--net` option this VMM does not know.
    #[error(
        "--net: unknown option '{0}': use fd=N or tap=NAME, then mac=MAC and optionally mtu=M"
    )]
    NetOption(String),
    /// A `--net` option given twice.
    #[error("--net: option '{0}' is given twice")]
    NetDuplicate(String),
    /// Neither or both of `fd=` and `tap=`.
    #[error("--net '{0}': name exactly one TAP, either fd=N (an open TAP descriptor) or tap=NAME")]
    NetBackend(String),
    /// `fd=` is not a descriptor number.
    #[error("--net fd={0} is not a file descriptor number")]
    NetFd(String),
    /// `tap=` is not an interface name.
    #[error(
        "--net tap={0} is not an interface name: use 1 to 15 bytes without '/', ':' or whitespace"
    )]
    NetTapName(String),
    /// `mac=` is missing.
    #[error(
        "--net '{0}' has no mac=MAC: the guest needs its MAC address (e.g. mac=02:00:00:00:00:01)"
    )]
    NetMacMissing(String),
    /// `mac=` is not a unicast MAC address.
    #[error("--net mac={0} is not a usable MAC address: give six hex bytes like 02:00:00:00:00:01, unicast and not all zeros")]
    NetMac(String),
    /// `mtu=` out of range.
    #[error("--net mtu={0} is out of range: use {NET_MIN_MTU} to 65535")]
    NetMtu(String),
    /// The descriptor of `fd=` is not a TAP the device can use.
    #[error("--net fd={fd}: {reason}")]
    NetNotTap { fd: i32, reason: String },
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
        if let Some(NetConfig {
            backend: NetBackend::Fd(fd),
            ..
        }) = &self.net
        {
            crate::devices::virtio::net::check_tap_fd(*fd).map_err(|e| match e {
                crate::devices::virtio::net::TapError::NotTap { fd, reason } => {
                    ConfigError::NetNotTap { fd, reason }
                }
                other => ConfigError::NetNotTap {
                    fd: *fd,
                    reason: other.to_string(),
                },
            })?;
        }
        Ok(())
    }
}

/// Parse `fd=N,mac=MAC[,mtu=M]` or `tap=NAME,mac=MAC[,mtu=M]` (the `--net` flag).
pub fn parse_net(s: &str) -> Result<NetConfig, ConfigError> {
    let (mut fd, mut tap, mut mac, mut mtu, mut offload) = (None, None, None, None, None);
    for option in s.split(',') {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| ConfigError::NetOption(option.to_string()))?;
        let slot = match key {
            "fd" => &mut fd,
            "tap" => &mut tap,
            "mac" => &mut mac,
            "mtu" => &mut mtu,
            "offload" => &mut offload,
            _ => return Err(ConfigError::NetOption(option.to_string())),
        };
        if slot.replace(value).is_some() {
            return Err(ConfigError::NetDuplicate(key.to_string()));
        }
    }
    let backend = match (fd, tap) {
        (Some(fd), None) => NetBackend::Fd(
            fd.parse::<i32>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| ConfigError::NetFd(fd.to_string()))?,
        ),
        (None, Some(name)) => {
            let bad = name.is_empty()
                || name.len() > 15
                || name == "."
                || name == ".."
                || name
                    .bytes()
                    .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
            if bad {
                return Err(ConfigError::NetTapName(name.to_string()));
            }
            NetBackend::Tap(name.to_string())
        }
        _ => return Err(ConfigError::NetBackend(s.to_string())),
    };
    let mac = mac.ok_or_else(|| ConfigError::NetMacMissing(s.to_string()))?;
    let mac = parse_mac(mac).ok_or_else(|| ConfigError::NetMac(mac.to_string()))?;
    let mtu = match mtu {
        None => None,
        Some(m) => Some(
            m.parse::<u32>()
                .ok()
                .filter(|v| *v >= NET_MIN_MTU)
                .and_then(|v| u16::try_from(v).ok())
                .ok_or_else(|| ConfigError::NetMtu(m.to_string()))?,
        ),
    };
    let offload = match offload {
        None | Some("on") => true,
        Some("off") => false,
        Some(other) => return Err(ConfigError::NetOption(format!("offload={other}"))),
    };
    Ok(NetConfig {
        backend,
        mac,
        mtu,
        offload,
    })
}

/// A unicast, non-zero MAC address written as six `:`-separated hex bytes.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    let multicast = mac[0] & 1 != 0;
    (parts.next().is_none() && !multicast && mac != [0; 6]).then_some(mac)
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
            thp: false,
            free_page_reporting: false,
            console: ConsoleTarget::Off,
            vsock: None,
            fs: None,
            net: None,
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

    #[test]
    fn net_flags_parse() {
        assert_eq!(
            parse_net("fd=3,mac=02:00:00:00:00:01"),
            Ok(NetConfig {
                backend: NetBackend::Fd(3),
                mac: [2, 0, 0, 0, 0, 1],
                mtu: None,
                offload: true,
            })
        );
        assert!(
            !parse_net("fd=3,mac=02:00:00:00:00:01,offload=off")
                .unwrap()
                .offload
        );
        assert!(matches!(
            parse_net("fd=3,mac=02:00:00:00:00:01,offload=maybe"),
            Err(ConfigError::NetOption(_))
        ));
        assert_eq!(
            parse_net("tap=tap0,mac=aa:bb:cc:dd:ee:fe,mtu=9000"),
            Ok(NetConfig {
                backend: NetBackend::Tap("tap0".into()),
                mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xfe],
                mtu: Some(9000),
                offload: true,
            })
        );
        let mac = "mac=02:00:00:00:00:01";
        assert_eq!(
            parse_net("mac=02:00:00:00:00:01"),
            Err(ConfigError::NetBackend(mac.into()))
        );
        assert!(matches!(
            parse_net(&format!("fd=3,tap=t,{mac}")),
            Err(ConfigError::NetBackend(_))
        ));
        assert_eq!(
            parse_net("fd=three,mac=02:00:00:00:00:01"),
            Err(ConfigError::NetFd("three".into()))
        );
        assert_eq!(
            parse_net(&format!("tap=a/b,{mac}")),
            Err(ConfigError::NetTapName("a/b".into()))
        );
        assert_eq!(
            parse_net(&format!("tap={},{mac}", "t".repeat(16))),
            Err(ConfigError::NetTapName("t".repeat(16)))
        );
        assert!(matches!(
            parse_net("fd=3"),
            Err(ConfigError::NetMacMissing(_))
        ));
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "zz:00:00:00:00:01",
            "2:0:0:0:0:1",
        ] {
            assert_eq!(
                parse_net(&format!("fd=3,mac={bad}")),
                Err(ConfigError::NetMac(bad.into())),
                "{bad}"
            );
        }
        for bad in ["67", "65536", "0", "-1", "big"] {
            assert_eq!(
                parse_net(&format!("fd=3,{mac},mtu={bad}")),
                Err(ConfigError::NetMtu(bad.into()))
            );
        }
        assert_eq!(
            parse_net(&format!("fd=3,{mac},speed=10")),
            Err(ConfigError::NetOption("speed=10".into()))
        );
        assert_eq!(
            parse_net(&format!("fd=3,{mac},fd=4")),
            Err(ConfigError::NetDuplicate("fd".into()))
        );
        let msg = parse_net("fd=3,mac=01:00:5e:00:00:01")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("01:00:5e:00:00:01") && msg.contains("unicast"),
            "{msg}"
        );
    }

    #[test]
    fn a_net_fd_that_is_not_a_tap_is_refused() {
        let exe = std::env::current_exe().unwrap();
        let file = std::fs::File::open(&exe).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let mut c = config(exe);
        c.net = Some(parse_net(&format!("fd={fd},mac=02:00:00:00:00:01")).unwrap());
        match c.validate() {
            Err(ConfigError::NetNotTap { fd: got, reason }) => {
                assert_eq!(got, fd);
                assert!(reason.contains("not a TUN/TAP"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        drop(file);
        // Closed now: not open at all.
        assert!(matches!(c.validate(), Err(ConfigError::NetNotTap { .. })));
    }
}

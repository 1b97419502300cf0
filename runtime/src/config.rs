//! Runtime configuration: one TOML file (`/etc/brig/brig.toml`, or `$BRIG_CONFIG`), every
//! field optional, with defaults that work without any file.
//!
//! ```toml
//! kernel = "/usr/local/share/brig/vmlinux"          # guest vmlinux (PVH)
//! initrd = "/usr/local/share/brig/initramfs.cpio.gz" # guest initramfs with the agent
//! vmm = "/usr/local/bin/brig-vmm"
//! root = "/run/brig"                                 # state directory
//! cpus = 1
//! memory_mib = 256
//! boot_timeout_secs = 60
//! fs_cache = "auto"   # what guests cache of the shared root filesystems: auto, metadata,
//!                     # never, always (brig-vmm --fs-cache; metadata = direct I/O for data)
//! console_limit = 1048576  # bytes of a sandbox's console.log kept (its newest part)
//! vmm_log_limit = 1048576  # bytes of a sandbox's vmm.log kept (its newest part)
//! network = "bridge"       # `brig run`'s default --network: bridge or none
//! bridge_subnet = "10.89.0.0/24"  # addresses of the bridge network (gateway: its .1)
//! cni_plugin_dir = "/usr/lib/cni" # where the CNI plugins are
//! net_offload = true       # offer guests checksum/segmentation offloads on their NIC
//! pvm_guest_kernel = false # on a PVM host: trust that `kernel` is a PVM guest kernel
//! guest_thp = false        # back guest memory with transparent huge pages (brig-vmm --thp)
//! kernel_params = ""       # appended to the guest kernel's command line
//! free_page_reporting = true # the guest reports memory it freed; the host takes it back
//! image_root = "/var/lib/brig"   # pulled images and containers' writable layers
//! insecure_registries = []       # registries (host[:port]) pulled from over plain HTTP
//! ```
//! Environment variables override the file: `BRIG_KERNEL`, `BRIG_INITRD`, `BRIG_VMM`,
//! `BRIG_ROOT`, `BRIG_FS_CACHE`, `BRIG_NETWORK`, `BRIG_IMAGE_ROOT`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default directory of the image store.
pub const DEFAULT_IMAGE_ROOT: &str = "/var/lib/brig";

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/brig/brig.toml";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/mistyped fields.
    #[error("config file {path} is invalid: {reason}")]
    Parse { path: PathBuf, reason: String },
    /// A file the runtime needs cannot be found.
    #[error("{what} not found (looked in: {looked}); {fix}")]
    Missing {
        what: &'static str,
        looked: String,
        fix: &'static str,
    },
    /// A value that is not one of the allowed ones.
    #[error("fs_cache (or BRIG_FS_CACHE) is {0:?}: use one of {FS_CACHE_MODES:?}")]
    FsCache(String),
    /// A log cap too small to hold a kernel panic's lines.
    #[error("{field} is {value} bytes: it must be at least {MIN_LOG_LIMIT} (16 KiB)")]
    LogLimit { field: &'static str, value: u64 },
    /// Kernel parameters that cannot be passed on a command line.
    #[error("kernel_params {0:?} holds a control character or is longer than {MAX_KERNEL_PARAMS} bytes: give space-separated parameters on one line")]
    KernelParams(String),
    /// A default network mode that is not one of the allowed ones.
    #[error("network (or BRIG_NETWORK) is {0:?}: use \"bridge\" or \"none\"")]
    Network(String),
}

/// Longest `kernel_params`: the rest of the guest's 2048-byte command line is Brig's.
pub const MAX_KERNEL_PARAMS: usize = 1024;

/// Default cap of a sandbox's `console.log` and `vmm.log`, bytes.
pub const DEFAULT_LOG_LIMIT: u64 = 1024 * 1024;

/// Smallest log cap (brig-vmm's own minimum): room for a kernel panic's lines.
pub const MIN_LOG_LIMIT: u64 = 16 * 1024;

/// The virtio-fs cache modes brig-vmm knows (`--fs-cache`).
pub const FS_CACHE_MODES: [&str; 4] = ["auto", "metadata", "never", "always"];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    vmm: Option<PathBuf>,
    root: Option<PathBuf>,
    cpus: Option<u8>,
    memory_mib: Option<u64>,
    boot_timeout_secs: Option<u64>,
    fs_cache: Option<String>,
    console_limit: Option<u64>,
    vmm_log_limit: Option<u64>,
    network: Option<String>,
    bridge_subnet: Option<String>,
    cni_plugin_dir: Option<PathBuf>,
    net_offload: Option<bool>,
    pvm_guest_kernel: Option<bool>,
    guest_thp: Option<bool>,
    kernel_params: Option<String>,
    free_page_reporting: Option<bool>,
    image_root: Option<PathBuf>,
    insecure_registries: Option<Vec<String>>,
}

/// Resolved runtime configuration.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Guest kernel (uncompressed vmlinux with a PVH note).
    pub kernel: PathBuf,
    /// Guest initramfs holding the agent.
    pub initrd: PathBuf,
    /// The `brig-vmm` binary.
    pub vmm: PathBuf,
    /// State root (`sandboxes/<id>/`, `containers/<id>/`: see [`crate::state`]).
    pub root: PathBuf,
    /// Default vCPUs per sandbox.
    pub cpus: u8,
    /// Default guest memory per sandbox, MiB.
    pub memory_mib: u64,
    /// How long a sandbox may take to answer from its agent.
    pub boot_timeout: Duration,
    /// What guests may cache of the share (one of [`FS_CACHE_MODES`]).
    pub fs_cache: String,
    /// Cap of a sandbox's guest console file, bytes (brig-vmm `--console-limit`): the guest
    /// decides how much it prints, and only the newest part is kept.
    pub console_limit: u64,
    /// Cap of a sandbox's VMM log, bytes (brig-vmm `--log-limit`).
    pub vmm_log_limit: u64,
    /// `brig run`'s default network mode: `bridge` or `none`.
    pub network: String,
    /// Subnet of the bridge network.
    pub bridge_subnet: String,
    /// Where the CNI plugins are.
    pub cni_plugin_dir: PathBuf,
    /// Offer guests checksum and segmentation offloads on their NIC (brig-vmm
    /// `--net …,offload=`): off, every frame crosses whole and checksummed.
    pub net_offload: bool,
    /// On a PVM host, take `kernel` for a PVM guest kernel even when Brig finds none of the
    /// marks such kernels carry (the boot check is skipped then).
    pub pvm_guest_kernel: bool,
    /// Back guest memory with transparent huge pages (brig-vmm `--thp`): fewer TLB misses,
    /// but an idle guest then costs the host about twice the memory it uses.
    pub guest_thp: bool,
    /// Appended to the guest kernel's command line (after Brig's own parameters, so a
    /// parameter given twice takes this value where the kernel keeps the last one).
    pub kernel_params: String,
    /// Give guests a balloon for free page reporting (brig-vmm `--free-page-reporting`): the
    /// memory a guest frees goes back to the host, so an idle sandbox shrinks after a spike.
    pub free_page_reporting: bool,
    /// The image store (`brig pull`, `brig run IMAGE`): unpacked layers, and the writable
    /// layers of containers made from images. On a disk, not under /run: containers write
    /// there.
    pub image_root: PathBuf,
    /// Registries (`host[:port]`) that images are pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
}

impl RuntimeConfig {
    /// Load from `$BRIG_CONFIG` or `/etc/brig/brig.toml` (if present), then apply the
    /// environment overrides and fill in defaults.
    pub fn load() -> Result<Self, ConfigError> {
        let path = std::env::var_os("BRIG_CONFIG").map(PathBuf::from);
        Self::load_from(path.as_deref())
    }

    /// Load from `path` (a runtime's options name it: the shim's `ConfigPath`), else from
    /// `/etc/brig/brig.toml` if present; then the environment overrides and defaults.
    pub fn load_from(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::resolve(
            config_file(path)?,
            |k| std::env::var_os(k).map(PathBuf::from),
            &share_dirs(),
            &bin_dirs(),
        )
    }

    /// Only the state root of the configuration at `path` (or the default one): for
    /// cleaning up, which needs no kernel, initramfs or VMM.
    pub fn state_root(path: Option<&Path>) -> Result<PathBuf, ConfigError> {
        let file = config_file(path)?;
        Ok(root_of(file.root, |k| {
            std::env::var_os(k).map(PathBuf::from)
        }))
    }

    /// Only the image store's settings (its directory, the plain-HTTP registries): `brig
    /// pull`, `images` and `rmi` need no kernel, initramfs or VMM.
    pub fn image_settings() -> Result<(PathBuf, Vec<String>), ConfigError> {
        let path = std::env::var_os("BRIG_CONFIG").map(PathBuf::from);
        let file = config_file(path.as_deref())?;
        let root = std::env::var_os("BRIG_IMAGE_ROOT")
            .map(PathBuf::from)
            .or(file.image_root)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE_ROOT));
        Ok((root, file.insecure_registries.unwrap_or_default()))
    }

    fn resolve(
        file: ConfigFile,
        env: impl Fn(&str) -> Option<PathBuf>,
        share_dirs: &[PathBuf],
        bin_dirs: &[PathBuf],
    ) -> Result<Self, ConfigError> {
        let kernel =
            pick(env("BRIG_KERNEL").or(file.kernel), share_dirs, "vmlinux").ok_or_else(|| {
                ConfigError::Missing {
                    what: "guest kernel (vmlinux)",
                    looked: looked(share_dirs, "vmlinux"),
                    fix: "build it with `make kernel`, or set `kernel` in brig.toml or BRIG_KERNEL",
                }
            })?;
        let initrd = pick(
            env("BRIG_INITRD").or(file.initrd),
            share_dirs,
            "initramfs.cpio.gz",
        )
        .ok_or_else(|| ConfigError::Missing {
            what: "guest initramfs (initramfs.cpio.gz)",
            looked: looked(share_dirs, "initramfs.cpio.gz"),
            fix: "build it with `make initramfs`, or set `initrd` in brig.toml or BRIG_INITRD",
        })?;
        let vmm = pick(env("BRIG_VMM").or(file.vmm), bin_dirs, "brig-vmm").ok_or_else(|| {
            ConfigError::Missing {
                what: "brig-vmm",
                looked: looked(bin_dirs, "brig-vmm"),
                fix: "install it next to brig, or set `vmm` in brig.toml or BRIG_VMM",
            }
        })?;
        let fs_cache = env("BRIG_FS_CACHE")
            .map(|v| v.to_string_lossy().into_owned())
            .or(file.fs_cache)
            .unwrap_or_else(|| "auto".into());
        if !FS_CACHE_MODES.contains(&fs_cache.as_str()) {
            return Err(ConfigError::FsCache(fs_cache));
        }
        let limit = |field: &'static str, value: Option<u64>| match value {
            Some(value) if value < MIN_LOG_LIMIT => Err(ConfigError::LogLimit { field, value }),
            value => Ok(value.unwrap_or(DEFAULT_LOG_LIMIT)),
        };
        let console_limit = limit("console_limit", file.console_limit)?;
        let vmm_log_limit = limit("vmm_log_limit", file.vmm_log_limit)?;
        let network = env("BRIG_NETWORK")
            .map(|v| v.to_string_lossy().into_owned())
            .or(file.network)
            .unwrap_or_else(|| "bridge".into());
        if network != "bridge" && network != "none" {
            return Err(ConfigError::Network(network));
        }
        let kernel_params = file.kernel_params.unwrap_or_default();
        if kernel_params.len() > MAX_KERNEL_PARAMS || kernel_params.chars().any(char::is_control) {
            return Err(ConfigError::KernelParams(kernel_params));
        }
        Ok(Self {
            kernel,
            initrd,
            vmm,
            root: root_of(file.root, &env),
            cpus: file.cpus.unwrap_or(1),
            memory_mib: file.memory_mib.unwrap_or(256),
            boot_timeout: Duration::from_secs(file.boot_timeout_secs.unwrap_or(60)),
            fs_cache,
            console_limit,
            vmm_log_limit,
            network,
            bridge_subnet: file.bridge_subnet.unwrap_or_else(|| "10.89.0.0/24".into()),
            cni_plugin_dir: file
                .cni_plugin_dir
                .unwrap_or_else(|| PathBuf::from("/usr/lib/cni")),
            net_offload: file.net_offload.unwrap_or(true),
            pvm_guest_kernel: file.pvm_guest_kernel.unwrap_or(false),
            guest_thp: file.guest_thp.unwrap_or(false),
            kernel_params: kernel_params.trim().to_string(),
            free_page_reporting: file.free_page_reporting.unwrap_or(true),
            image_root: env("BRIG_IMAGE_ROOT")
                .or(file.image_root)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE_ROOT)),
            insecure_registries: file.insecure_registries.unwrap_or_default(),
        })
    }
}

/// The file at `path`, else the default file if it exists, else an empty one.
fn config_file(path: Option<&Path>) -> Result<ConfigFile, ConfigError> {
    match path {
        Some(p) => read_file(p),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            read_file(Path::new(DEFAULT_CONFIG_PATH))
        }
        None => Ok(ConfigFile::default()),
    }
}

fn root_of(file_root: Option<PathBuf>, env: impl Fn(&str) -> Option<PathBuf>) -> PathBuf {
    env("BRIG_ROOT")
        .or(file_root)
        .unwrap_or_else(|| PathBuf::from("/run/brig"))
}

fn read_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        reason: e.to_string(),
    })
}

/// An explicit path wins (even if missing: the VMM then names it); otherwise the first
/// directory holding `name`.
fn pick(explicit: Option<PathBuf>, dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    explicit.or_else(|| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
}

fn looked(dirs: &[PathBuf], name: &str) -> String {
    dirs.iter()
        .map(|d| d.join(name).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

/// `<exe>/../share/brig`, then the usual install prefixes.
fn share_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = exe_dir()
        .map(|d| d.join("../share/brig"))
        .into_iter()
        .collect();
    dirs.push("/usr/local/share/brig".into());
    dirs.push("/usr/share/brig".into());
    dirs
}

/// The directory of the running binary, then `$PATH`.
fn bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = exe_dir().into_iter().collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_paths_and_defaults() {
        let file: ConfigFile =
            toml::from_str("kernel = \"/k\"\ninitrd = \"/i\"\nvmm = \"/v\"\ncpus = 2").unwrap();
        let cfg = RuntimeConfig::resolve(file, |_| None, &[], &[]).unwrap();
        assert_eq!(cfg.kernel, PathBuf::from("/k"));
        assert_eq!(cfg.cpus, 2);
        assert_eq!(cfg.memory_mib, 256);
        assert_eq!(cfg.root, PathBuf::from("/run/brig"));
        let file: ConfigFile =
            toml::from_str("kernel = \"/k\"\ninitrd = \"/i\"\nvmm = \"/v\"").unwrap();
        let env = |k: &str| (k == "BRIG_KERNEL").then(|| PathBuf::from("/env/k"));
        let cfg = RuntimeConfig::resolve(file, env, &[], &[]).unwrap();
        assert_eq!(cfg.kernel, PathBuf::from("/env/k"));
    }

    #[test]
    fn kernel_params_are_one_line_of_bounded_length() {
        let resolve = |params: &str| {
            let file = ConfigFile {
                kernel: Some("/k".into()),
                initrd: Some("/i".into()),
                vmm: Some("/v".into()),
                kernel_params: Some(params.into()),
                ..ConfigFile::default()
            };
            RuntimeConfig::resolve(file, |_| None, &[], &[])
        };
        assert_eq!(
            resolve(" rdinit=/x  loglevel=7 ").unwrap().kernel_params,
            "rdinit=/x  loglevel=7"
        );
        for bad in ["a\nb", "a\u{0}b", &"x".repeat(MAX_KERNEL_PARAMS + 1)] {
            let err = resolve(bad).unwrap_err().to_string();
            assert!(err.starts_with("kernel_params"), "{err}");
        }
    }

    #[test]
    fn the_fs_cache_mode_is_checked() {
        let file = || {
            toml::from_str::<ConfigFile>(
                "kernel = \"/k\"\ninitrd = \"/i\"\nvmm = \"/v\"\nfs_cache = \"metadata\"",
            )
            .unwrap()
        };
        assert_eq!(
            RuntimeConfig::resolve(file(), |_| None, &[], &[])
                .unwrap()
                .fs_cache,
            "metadata"
        );
        let env = |k: &str| (k == "BRIG_FS_CACHE").then(|| PathBuf::from("sometimes"));
        let msg = RuntimeConfig::resolve(file(), env, &[], &[])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("\"sometimes\"") && msg.contains("metadata"),
            "{msg}"
        );
    }

    #[test]
    fn log_caps_default_to_1_mib_and_can_be_set_but_not_below_16_kib() {
        let paths = "kernel = \"/k\"\ninitrd = \"/i\"\nvmm = \"/v\"\n";
        let resolve = |extra: &str| {
            let file: ConfigFile = toml::from_str(&format!("{paths}{extra}")).unwrap();
            RuntimeConfig::resolve(file, |_| None, &[], &[])
        };
        let cfg = resolve("").unwrap();
        assert_eq!((cfg.console_limit, cfg.vmm_log_limit), (1 << 20, 1 << 20));
        let cfg = resolve("console_limit = 65536\nvmm_log_limit = 32768").unwrap();
        assert_eq!((cfg.console_limit, cfg.vmm_log_limit), (65536, 32768));
        let msg = resolve("vmm_log_limit = 100").unwrap_err().to_string();
        assert!(
            msg.contains("vmm_log_limit") && msg.contains("16384"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(toml::from_str::<ConfigFile>("kernal = \"/k\"").is_err());
    }

    #[test]
    fn a_missing_kernel_says_how_to_fix_it() {
        let dirs = [PathBuf::from("/nonexistent/share/brig")];
        let msg = RuntimeConfig::resolve(ConfigFile::default(), |_| None, &dirs, &dirs)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/share/brig/vmlinux"), "{msg}");
        assert!(msg.contains("BRIG_KERNEL"), "{msg}");
        assert!(msg.contains("make kernel"), "{msg}");
    }
}

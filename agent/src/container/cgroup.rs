//! A container's cgroup v2 directory: limits, membership, statistics, removal.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use super::ContainerError;

/// Controllers the agent uses.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// How long removal waits for the killed processes to leave the cgroup.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Figures for Stats.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CgroupStats {
    /// memory.current.
    pub memory_current: u64,
    /// memory.max (0 = no limit).
    pub memory_max: u64,
    /// cpu.stat usage_usec.
    pub cpu_usage_usec: u64,
    /// pids.current.
    pub pids_current: u64,
    /// pids.max (0 = no limit).
    pub pids_max: u64,
    /// memory.events oom_kill.
    pub oom_kills: u64,
}

/// `<root>/<container id>`.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates the container's cgroup under `root` (made if missing), with controllers
    /// enabled on the way.
    pub fn create(root: &Path, container_id: &str) -> Result<Cgroup, ContainerError> {
        let fail = |what: String, err: io::Error| {
            ContainerError::Internal(format!(
                "cannot set up the container's cgroup: {what}: {err}"
            ))
        };
        if let Some(parent) = root.parent() {
            enable_controllers(parent);
        }
        if let Err(err) = fs::create_dir(root) {
            if err.kind() != io::ErrorKind::AlreadyExists {
                return Err(fail(format!("mkdir {}", root.display()), err));
            }
        }
        enable_controllers(root);
        let path = root.join(container_id);
        // A leftover of an earlier container with this id (empty: removal failed late).
        if path.exists() {
            let _ = fs::remove_dir(&path);
        }
        fs::create_dir(&path).map_err(|err| fail(format!("mkdir {}", path.display()), err))?;
        Ok(Cgroup { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `linux.resources` (memory, cpu, pids, and device access as a BPF filter).
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), ContainerError> {
        if let Some(memory) = resources.memory() {
            if let Some(limit) = memory.limit() {
                self.write("memory.max", &limit_value(limit))?;
                if limit > 0 {
                    // No swap beyond the limit; the file is missing without swap support.
                    match self.write("memory.swap.max", "0") {
                        Err(_) if !self.path.join("memory.swap.max").exists() => {}
                        other => other?,
                    }
                }
            }
        }
        if let Some(cpu) = resources.cpu() {
            if let Some(shares) = cpu.shares() {
                if shares > 0 {
                    self.write("cpu.weight", &shares_to_weight(shares).to_string())?;
                }
            }
            if cpu.quota().is_some() || cpu.period().is_some() {
                let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
                let quota = match cpu.quota() {
                    Some(quota) if quota > 0 => quota.to_string(),
                    _ => "max".to_string(),
                };
                self.write("cpu.max", &format!("{quota} {period}"))?;
            }
        }
        if let Some(pids) = resources.pids() {
            self.write("pids.max", &limit_value(pids.limit()))?;
        }
        if let Some(devices) = resources.devices().as_ref().filter(|d| !d.is_empty()) {
            let rules = super::devices::rules(devices).map_err(ContainerError::InvalidArgument)?;
            super::devices::apply(&self.path, &rules).map_err(ContainerError::Internal)?;
        }
        Ok(())
    }

    fn write(&self, file: &str, value: &str) -> Result<(), ContainerError> {
        fs::write(self.path.join(file), value).map_err(|err| {
            ContainerError::InvalidArgument(format!(
                "cannot set {file} = {value} in {}: {err}",
                self.path.display()
            ))
        })
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), ContainerError> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string()).map_err(|err| {
            ContainerError::Internal(format!(
                "cannot move process {pid} into cgroup {}: {err}",
                self.path.display()
            ))
        })
    }

    /// Pids in the cgroup.
    pub fn pids(&self) -> io::Result<Vec<i32>> {
        Ok(fs::read_to_string(self.path.join("cgroup.procs"))?
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect())
    }

    /// memory.events `oom_kill` (0 when unreadable).
    pub fn oom_kills(&self) -> u64 {
        read_keyed(&self.path.join("memory.events"), "oom_kill").unwrap_or(0)
    }

    /// Current figures.
    pub fn stats(&self) -> CgroupStats {
        CgroupStats {
            memory_current: read_value(&self.path.join("memory.current")).unwrap_or(0),
            memory_max: read_value(&self.path.join("memory.max")).unwrap_or(0),
            cpu_usage_usec: read_keyed(&self.path.join("cpu.stat"), "usage_usec").unwrap_or(0),
            pids_current: read_value(&self.path.join("pids.current")).unwrap_or(0),
            pids_max: read_value(&self.path.join("pids.max")).unwrap_or(0),
            oom_kills: self.oom_kills(),
        }
    }

    /// SIGKILLs everything in the cgroup and removes it once empty.
    pub fn kill_and_remove(&self) -> Result<(), ContainerError> {
        if fs::write(self.path.join("cgroup.kill"), "1").is_err() {
            // Kernels before 5.14 have no cgroup.kill.
            for pid in self.pids().unwrap_or_default() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(ContainerError::Internal(format!(
                        "cannot remove cgroup {}: {err}",
                        self.path.display()
                    )))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Enables our controllers in `dir`'s cgroup.subtree_control, one by one (some may be
/// missing); failures are logged.
fn enable_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for controller in CONTROLLERS {
        if available.split_whitespace().any(|c| c == controller) {
            if let Err(err) =
                fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"))
            {
                crate::warn!(
                    "cannot enable cgroup controller {controller} in {}: {err}",
                    dir.display()
                );
            }
        }
    }
}

/// A limit for memory.max / pids.max: positive = bytes/count, otherwise "max".
fn limit_value(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".to_string()
    }
}

/// cgroup v1 cpu.shares (2..=262144) to cgroup v2 cpu.weight (1..=10000), as runc does.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

fn read_value(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text == "max" {
        return Some(0);
    }
    text.parse().ok()
}

fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Whether `path` is on a cgroup2 filesystem.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_convert_like_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn limits() {
        assert_eq!(limit_value(-1), "max");
        assert_eq!(limit_value(0), "max");
        assert_eq!(limit_value(4096), "4096");
    }
}

//! A container's cgroup v2 directory: limits, membership, statistics, removal.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::LinuxResources;

use super::ContainerError;

/// Controllers the agent uses.
const CONTROLLERS: [&str; 4] = ["cpu", "cpuset", "memory", "pids"];
/// How long removal waits for the killed processes to leave the cgroup.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long pause waits for cgroup.events to say `frozen 1`.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes read from one cgroup file (memory.stat is about 1.5 KiB).
const MAX_FILE_BYTES: u64 = 64 * 1024;
/// The most memory.stat entries reported.
const MAX_STAT_ENTRIES: usize = 128;
/// The longest cpuset list accepted ("0-3,5,…").
const MAX_CPUSET_LEN: usize = 256;

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
    /// cpu.stat.
    pub cpu: CpuStat,
    /// memory.swap.current.
    pub memory_swap_current: u64,
    /// memory.swap.max (0 = no limit or no swap accounting).
    pub memory_swap_max: u64,
    /// memory.stat, key by key.
    pub memory_stat: HashMap<String, u64>,
    /// memory.events.
    pub memory_events: MemoryEvents,
}

/// The figures of cpu.stat (µs), 0 for any line missing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CpuStat {
    /// usage_usec.
    pub usage_usec: u64,
    /// user_usec.
    pub user_usec: u64,
    /// system_usec.
    pub system_usec: u64,
    /// nr_periods.
    pub nr_periods: u64,
    /// nr_throttled.
    pub nr_throttled: u64,
    /// throttled_usec.
    pub throttled_usec: u64,
}

/// memory.events, 0 for any line missing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryEvents {
    /// low.
    pub low: u64,
    /// high.
    pub high: u64,
    /// max.
    pub max: u64,
    /// oom.
    pub oom: u64,
    /// oom_kill.
    pub oom_kill: u64,
}

/// New limits for UpdateContainer (OCI LinuxResources meanings; `None` = leave as it is).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResourceUpdate {
    /// memory.limit (-1 = none).
    pub memory_limit: Option<i64>,
    /// memory.reservation (-1 = none).
    pub memory_reservation: Option<i64>,
    /// memory.swap, memory plus swap (-1 = unlimited).
    pub memory_swap: Option<i64>,
    /// cpu.shares.
    pub cpu_shares: Option<u64>,
    /// cpu.quota (-1 = none).
    pub cpu_quota: Option<i64>,
    /// cpu.period.
    pub cpu_period: Option<u64>,
    /// cpuset.cpus.
    pub cpuset_cpus: Option<String>,
    /// cpuset.mems.
    pub cpuset_mems: Option<String>,
    /// pids.limit (0 or -1 = none).
    pub pids_limit: Option<i64>,
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

    /// Current figures; a file that is missing or unreadable gives zeros.
    pub fn stats(&self) -> CgroupStats {
        let text = |file: &str| read_bounded(&self.path.join(file)).unwrap_or_default();
        let cpu = parse_cpu_stat(&text("cpu.stat"));
        let memory_events = parse_memory_events(&text("memory.events"));
        CgroupStats {
            memory_current: read_value(&self.path.join("memory.current")).unwrap_or(0),
            memory_max: read_value(&self.path.join("memory.max")).unwrap_or(0),
            cpu_usage_usec: cpu.usage_usec,
            pids_current: read_value(&self.path.join("pids.current")).unwrap_or(0),
            pids_max: read_value(&self.path.join("pids.max")).unwrap_or(0),
            oom_kills: memory_events.oom_kill,
            cpu,
            memory_swap_current: read_value(&self.path.join("memory.swap.current")).unwrap_or(0),
            memory_swap_max: read_value(&self.path.join("memory.swap.max")).unwrap_or(0),
            memory_stat: parse_memory_stat(&text("memory.stat")),
            memory_events,
        }
    }

    /// Freezes every process of the cgroup and waits until the kernel says it is frozen.
    /// On timeout the cgroup is thawed again and the error says so.
    pub fn freeze(&self) -> Result<(), ContainerError> {
        self.write_state("cgroup.freeze", "1")?;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        loop {
            if self.frozen() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.write_state("cgroup.freeze", "0");
                return Err(ContainerError::DeadlineExceeded(format!(
                    "the container's processes did not freeze within {} s (cgroup.events in {} never said frozen 1); it was thawed again",
                    FREEZE_TIMEOUT.as_secs(),
                    self.path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Thaws the cgroup.
    pub fn thaw(&self) -> Result<(), ContainerError> {
        self.write_state("cgroup.freeze", "0")
    }

    /// Whether cgroup.events says `frozen 1`.
    pub fn frozen(&self) -> bool {
        read_bounded(&self.path.join("cgroup.events"))
            .map(|text| keyed(&text, "frozen") == Some(1))
            .unwrap_or(false)
    }

    fn write_state(&self, file: &str, value: &str) -> Result<(), ContainerError> {
        fs::write(self.path.join(file), value).map_err(|err| {
            ContainerError::Internal(format!(
                "cannot write {value} to {}: {err}",
                self.path.join(file).display()
            ))
        })
    }

    /// Applies new limits: every value is checked before the first is written.
    pub fn update(&self, update: &ResourceUpdate) -> Result<(), ContainerError> {
        let current_cpu_max = read_bounded(&self.path.join("cpu.max")).unwrap_or_default();
        let writes = update_writes(update, &current_cpu_max)?;
        for (file, value) in writes {
            if file == "memory.swap.max" && !self.path.join(file).exists() {
                // The guest kernel has no swap at all (memory.swap.max exists wherever it
                // has): no container can use any, so every swap limit already holds. Engines
                // send one with each memory limit (podman: twice the memory).
                continue;
            }
            self.write(file, &value)?;
        }
        Ok(())
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

/// The cgroup file writes for `update`, in order, checked; `current_cpu_max` is the cgroup's
/// cpu.max now ("QUOTA PERIOD"), which supplies the half of cpu.max not being changed.
pub fn update_writes(
    update: &ResourceUpdate,
    current_cpu_max: &str,
) -> Result<Vec<(&'static str, String)>, ContainerError> {
    let invalid = |field: &str, why: String| {
        ContainerError::InvalidArgument(format!("invalid {field}: {why}"))
    };
    let bytes_or_max = |field: &str, v: i64| match v {
        -1 => Ok("max".to_string()),
        v if v > 0 => Ok(v.to_string()),
        v => Err(invalid(
            field,
            format!("{v} (use a positive number of bytes, or -1 for none)"),
        )),
    };
    let mut writes = Vec::new();
    if let Some(limit) = update.memory_limit {
        writes.push(("memory.max", bytes_or_max("memory_limit", limit)?));
    }
    if let Some(reservation) = update.memory_reservation {
        let value = match reservation {
            -1 | 0 => "0".to_string(),
            v => bytes_or_max("memory_reservation", v)?,
        };
        writes.push(("memory.low", value));
    }
    if let Some(swap) = update.memory_swap {
        let value = match (swap, update.memory_limit) {
            (-1, _) => "max".to_string(),
            (swap, _) if swap <= 0 => {
                return Err(invalid(
                    "memory_swap",
                    format!("{swap} (use -1 or memory plus swap in bytes)"),
                ))
            }
            (_, None) | (_, Some(-1)) => {
                return Err(invalid(
                    "memory_swap",
                    "memory plus swap needs a memory_limit in the same update".into(),
                ))
            }
            (swap, Some(limit)) if swap < limit => {
                return Err(invalid(
                    "memory_swap",
                    format!("{swap} is below memory_limit {limit} (it counts memory plus swap)"),
                ))
            }
            (swap, Some(limit)) => (swap - limit).to_string(),
        };
        writes.push(("memory.swap.max", value));
    }
    if let Some(shares) = update.cpu_shares {
        if !(2..=262_144).contains(&shares) {
            return Err(invalid("cpu_shares", format!("{shares} (use 2..=262144)")));
        }
        writes.push(("cpu.weight", shares_to_weight(shares).to_string()));
    }
    if update.cpu_quota.is_some() || update.cpu_period.is_some() {
        writes.push((
            "cpu.max",
            cpu_max(update.cpu_quota, update.cpu_period, current_cpu_max)?,
        ));
    }
    for (field, file, list) in [
        ("cpuset_cpus", "cpuset.cpus", &update.cpuset_cpus),
        ("cpuset_mems", "cpuset.mems", &update.cpuset_mems),
    ] {
        if let Some(list) = list {
            check_cpuset_list(list).map_err(|why| invalid(field, why))?;
            writes.push((file, list.clone()));
        }
    }
    if let Some(limit) = update.pids_limit {
        let value = match limit {
            -1 | 0 => "max".to_string(),
            v if v > 0 => v.to_string(),
            v => {
                return Err(invalid(
                    "pids_limit",
                    format!("{v} (use a positive count, or -1 for none)"),
                ))
            }
        };
        writes.push(("pids.max", value));
    }
    Ok(writes)
}

/// cpu.max for a new quota and/or period, keeping the other from `current` ("QUOTA PERIOD",
/// QUOTA "max" when unlimited).
pub fn cpu_max(
    quota: Option<i64>,
    period: Option<u64>,
    current: &str,
) -> Result<String, ContainerError> {
    let mut now = current.split_whitespace();
    let now_quota = now.next().unwrap_or("max").to_string();
    let now_period: u64 = now.next().and_then(|p| p.parse().ok()).unwrap_or(100_000);
    let period = match period {
        Some(p) if !(1_000..=1_000_000).contains(&p) => {
            return Err(ContainerError::InvalidArgument(format!(
                "invalid cpu_period: {p} (use 1000..=1000000 µs)"
            )))
        }
        Some(p) => p,
        None => now_period,
    };
    let quota = match quota {
        None => now_quota,
        Some(-1) => "max".to_string(),
        Some(q) if q >= 1_000 => q.to_string(),
        Some(q) => {
            return Err(ContainerError::InvalidArgument(format!(
                "invalid cpu_quota: {q} (use at least 1000 µs, or -1 for none)"
            )))
        }
    };
    Ok(format!("{quota} {period}"))
}

/// A cpuset list: "N", "N-M", comma-separated, or empty (inherit).
fn check_cpuset_list(list: &str) -> Result<(), String> {
    if list.len() > MAX_CPUSET_LEN {
        return Err(format!("longer than {MAX_CPUSET_LEN} characters"));
    }
    if list.is_empty() {
        return Ok(());
    }
    let number = |n: &str| {
        n.parse::<u32>()
            .map_err(|_| format!("{list:?} is not a list like 0-2,4"))
    };
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if number(a)? > number(b)? {
                    return Err(format!("{list:?}: range {part} goes backwards"));
                }
            }
            None => {
                number(part)?;
            }
        }
    }
    Ok(())
}

/// `KEY VALUE` lines to the value of `key`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// cpu.stat.
pub fn parse_cpu_stat(text: &str) -> CpuStat {
    let get = |key| keyed(text, key).unwrap_or(0);
    CpuStat {
        usage_usec: get("usage_usec"),
        user_usec: get("user_usec"),
        system_usec: get("system_usec"),
        nr_periods: get("nr_periods"),
        nr_throttled: get("nr_throttled"),
        throttled_usec: get("throttled_usec"),
    }
}

/// memory.events.
pub fn parse_memory_events(text: &str) -> MemoryEvents {
    let get = |key| keyed(text, key).unwrap_or(0);
    MemoryEvents {
        low: get("low"),
        high: get("high"),
        max: get("max"),
        oom: get("oom"),
        oom_kill: get("oom_kill"),
    }
}

/// memory.stat: every `KEY VALUE` line whose value is a number, at most
/// [`MAX_STAT_ENTRIES`] of them.
pub fn parse_memory_stat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .take(MAX_STAT_ENTRIES)
        .collect()
}

/// A cgroup file's text, at most [`MAX_FILE_BYTES`] of it.
fn read_bounded(path: &Path) -> Option<String> {
    let mut text = String::new();
    fs::File::open(path)
        .ok()?
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

fn read_value(path: &Path) -> Option<u64> {
    let text = read_bounded(path)?;
    let text = text.trim();
    if text == "max" {
        return Some(0);
    }
    text.parse().ok()
}

fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    keyed(&read_bounded(path)?, key)
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
    fn cpu_stat_is_parsed_and_missing_lines_are_zero() {
        let text = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\nnr_periods 50\nnr_throttled 7\nthrottled_usec 999\n";
        assert_eq!(
            parse_cpu_stat(text),
            CpuStat {
                usage_usec: 1234,
                user_usec: 1000,
                system_usec: 234,
                nr_periods: 50,
                nr_throttled: 7,
                throttled_usec: 999,
            }
        );
        // Without cpu.max set the kernel prints no nr_* lines; garbage is skipped.
        let partial = parse_cpu_stat("usage_usec 5\nuser_usec x\n\nnoise\n");
        assert_eq!(partial.usage_usec, 5);
        assert_eq!(partial.user_usec, 0);
        assert_eq!(partial.nr_throttled, 0);
        assert_eq!(parse_cpu_stat(""), CpuStat::default());
    }

    #[test]
    fn memory_events_are_parsed() {
        let text = "low 1\nhigh 2\nmax 3\noom 4\noom_kill 5\noom_group_kill 6\n";
        assert_eq!(
            parse_memory_events(text),
            MemoryEvents {
                low: 1,
                high: 2,
                max: 3,
                oom: 4,
                oom_kill: 5
            }
        );
        assert_eq!(parse_memory_events("oom_kill 2").oom_kill, 2);
        assert_eq!(parse_memory_events("").oom_kill, 0);
    }

    #[test]
    fn memory_stat_keeps_numeric_lines_and_is_bounded() {
        let text = "anon 4096\nfile 8192\nkernel_stack 16384\nslab 100\npgfault 12\nbogus\nweird x\ninactive_file 7\n";
        let stat = parse_memory_stat(text);
        assert_eq!(stat.get("anon"), Some(&4096));
        assert_eq!(stat.get("file"), Some(&8192));
        assert_eq!(stat.get("kernel_stack"), Some(&16384));
        assert_eq!(stat.get("pgfault"), Some(&12));
        assert_eq!(stat.get("inactive_file"), Some(&7));
        assert_eq!(stat.len(), 6);
        let many: String = (0..1000).map(|i| format!("k{i} {i}\n")).collect();
        assert_eq!(parse_memory_stat(&many).len(), MAX_STAT_ENTRIES);
    }

    #[test]
    fn shares_between_the_ends_convert_like_runc() {
        // 1 + ((shares - 2) * 9999) / 262142, integer division.
        assert_eq!(shares_to_weight(512), 1 + (510 * 9999) / 262_142);
        assert_eq!(shares_to_weight(512), 20);
        assert_eq!(shares_to_weight(100_000), 3815);
    }

    #[test]
    fn cpu_max_keeps_the_half_not_given() {
        assert_eq!(
            cpu_max(Some(50_000), Some(100_000), "max 100000").unwrap(),
            "50000 100000"
        );
        assert_eq!(
            cpu_max(Some(20_000), None, "max 250000").unwrap(),
            "20000 250000"
        );
        assert_eq!(
            cpu_max(None, Some(50_000), "30000 100000").unwrap(),
            "30000 50000"
        );
        assert_eq!(
            cpu_max(Some(-1), None, "30000 100000").unwrap(),
            "max 100000"
        );
        assert_eq!(cpu_max(Some(10_000), None, "").unwrap(), "10000 100000");
        let err = cpu_max(Some(5), None, "max 100000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpu_quota"), "{err}");
        let err = cpu_max(None, Some(10), "max 100000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpu_period"), "{err}");
    }

    #[test]
    fn updates_become_cgroup_writes() {
        let update = ResourceUpdate {
            memory_limit: Some(64 << 20),
            memory_reservation: Some(32 << 20),
            memory_swap: Some(128 << 20),
            cpu_shares: Some(1024),
            cpu_quota: Some(50_000),
            cpuset_cpus: Some("0".into()),
            cpuset_mems: Some("0".into()),
            pids_limit: Some(5),
            ..Default::default()
        };
        let writes = update_writes(&update, "max 100000").unwrap();
        assert_eq!(
            writes,
            vec![
                ("memory.max", "67108864".to_string()),
                ("memory.low", "33554432".to_string()),
                ("memory.swap.max", "67108864".to_string()),
                ("cpu.weight", "39".to_string()),
                ("cpu.max", "50000 100000".to_string()),
                ("cpuset.cpus", "0".to_string()),
                ("cpuset.mems", "0".to_string()),
                ("pids.max", "5".to_string()),
            ]
        );
        let unlimited = ResourceUpdate {
            memory_limit: Some(-1),
            memory_swap: Some(-1),
            pids_limit: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            update_writes(&unlimited, "").unwrap(),
            vec![
                ("memory.max", "max".to_string()),
                ("memory.swap.max", "max".to_string()),
                ("pids.max", "max".to_string()),
            ]
        );
        assert!(update_writes(&ResourceUpdate::default(), "")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn bad_updates_name_their_field_and_write_nothing() {
        let cases = [
            (
                ResourceUpdate {
                    memory_limit: Some(0),
                    ..Default::default()
                },
                "memory_limit",
            ),
            (
                ResourceUpdate {
                    memory_limit: Some(-5),
                    ..Default::default()
                },
                "memory_limit",
            ),
            (
                ResourceUpdate {
                    memory_swap: Some(1 << 30),
                    ..Default::default()
                },
                "memory_swap",
            ),
            (
                ResourceUpdate {
                    memory_limit: Some(1 << 30),
                    memory_swap: Some(1 << 20),
                    ..Default::default()
                },
                "memory_swap",
            ),
            (
                ResourceUpdate {
                    cpu_shares: Some(1),
                    ..Default::default()
                },
                "cpu_shares",
            ),
            (
                ResourceUpdate {
                    cpu_shares: Some(300_000),
                    ..Default::default()
                },
                "cpu_shares",
            ),
            (
                ResourceUpdate {
                    cpuset_cpus: Some("0-x".into()),
                    ..Default::default()
                },
                "cpuset_cpus",
            ),
            (
                ResourceUpdate {
                    cpuset_mems: Some("3-1".into()),
                    ..Default::default()
                },
                "cpuset_mems",
            ),
            (
                ResourceUpdate {
                    cpuset_cpus: Some("0,".repeat(200)),
                    ..Default::default()
                },
                "cpuset_cpus",
            ),
            (
                ResourceUpdate {
                    pids_limit: Some(-2),
                    ..Default::default()
                },
                "pids_limit",
            ),
            // A bad value late in the list fails the whole update, good ones included.
            (
                ResourceUpdate {
                    memory_limit: Some(1 << 30),
                    pids_limit: Some(-7),
                    ..Default::default()
                },
                "pids_limit",
            ),
        ];
        for (update, field) in cases {
            match update_writes(&update, "max 100000") {
                Err(ContainerError::InvalidArgument(msg)) => {
                    assert!(msg.contains(field), "{field}: {msg}")
                }
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn cpuset_lists() {
        assert!(check_cpuset_list("").is_ok());
        assert!(check_cpuset_list("0-3,5,7-8").is_ok());
        assert!(check_cpuset_list("a").is_err());
        assert!(check_cpuset_list("1,,2").is_err());
    }

    #[test]
    fn freeze_and_thaw_write_cgroup_freeze_and_read_cgroup_events() {
        // A directory standing in for a cgroup: the "kernel" here is the test itself.
        let dir = std::env::temp_dir().join(format!("brig-cgroup-freeze-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let cgroup = Cgroup { path: dir.clone() };
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
        cgroup.freeze().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "1");
        assert!(cgroup.frozen());
        cgroup.thaw().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "0");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn limits() {
        assert_eq!(limit_value(-1), "max");
        assert_eq!(limit_value(0), "max");
        assert_eq!(limit_value(4096), "4096");
    }
}

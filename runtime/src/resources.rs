//! A container's cgroup limits as the runtime speaks of them ([`Resources`], what
//! `Container::update` takes), and its cgroup v2 figures ([`Stats`], what `Container::stats`
//! gives), converted from the agent's replies with every guest-supplied size bounded.

use std::collections::BTreeMap;

use brig_protocols::agent::StatsResponse;
use oci_spec::runtime::LinuxResources;

/// The most `memory.stat` entries kept from one reply (the kernel has about 50).
pub const MAX_MEMORY_STAT_ENTRIES: usize = 128;
/// The longest `memory.stat` key kept (the kernel's longest is about 30 characters).
pub const MAX_MEMORY_STAT_KEY: usize = 64;

/// New cgroup limits for a container, with the OCI runtime spec's `LinuxResources` meanings;
/// `None` leaves a limit as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// Memory limit in bytes; -1 = none.
    pub memory_limit: Option<i64>,
    /// Memory reservation (soft guarantee, `memory.low`) in bytes; -1 = none.
    pub memory_reservation: Option<i64>,
    /// Memory plus swap in bytes, as OCI and runc count it; -1 = unlimited swap.
    pub memory_swap: Option<i64>,
    /// CPU shares (2..=262144), written as cgroup v2 `cpu.weight`.
    pub cpu_shares: Option<u64>,
    /// CPU quota in µs per period; -1 = none.
    pub cpu_quota: Option<i64>,
    /// CPU period in µs.
    pub cpu_period: Option<u64>,
    /// CPUs the container may use, e.g. `0-1,3`.
    pub cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    pub cpuset_mems: Option<String>,
    /// Most processes; -1 = no limit.
    pub pids_limit: Option<i64>,
}

impl Resources {
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

impl From<&LinuxResources> for Resources {
    fn from(r: &LinuxResources) -> Self {
        let memory = r.memory().as_ref();
        let cpu = r.cpu().as_ref();
        Self {
            memory_limit: memory.and_then(|m| m.limit()),
            memory_reservation: memory.and_then(|m| m.reservation()),
            memory_swap: memory.and_then(|m| m.swap()),
            cpu_shares: cpu.and_then(|c| c.shares()),
            cpu_quota: cpu.and_then(|c| c.quota()),
            cpu_period: cpu.and_then(|c| c.period()),
            cpuset_cpus: cpu.and_then(|c| c.cpus().clone()),
            cpuset_mems: cpu.and_then(|c| c.mems().clone()),
            pids_limit: r.pids().as_ref().map(|p| p.limit()),
        }
    }
}

/// A container's cgroup v2 figures, read in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `cpu.stat`.
    pub cpu: CpuStats,
    /// `memory.*`.
    pub memory: MemoryStats,
    /// `pids.*`.
    pub pids: PidsStats,
}

/// `cpu.stat`, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
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

/// Memory figures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// `memory.current`.
    pub usage_bytes: u64,
    /// `memory.max` (0 = no limit).
    pub limit_bytes: u64,
    /// `memory.swap.current`.
    pub swap_usage_bytes: u64,
    /// `memory.swap.max` (0 = no limit, or no swap accounting).
    pub swap_limit_bytes: u64,
    /// `memory.stat` (anon, file, inactive_file, …), bounded: at most
    /// [`MAX_MEMORY_STAT_ENTRIES`] keys of lowercase letters, digits and `_`.
    pub stat: BTreeMap<String, u64>,
    /// `memory.events`.
    pub events: MemoryEvents,
}

impl MemoryStats {
    /// Usage minus inactive file pages: what the kubelet calls the working set.
    pub fn working_set_bytes(&self) -> u64 {
        let inactive_file = self.stat.get("inactive_file").copied().unwrap_or(0);
        self.usage_bytes.saturating_sub(inactive_file)
    }
}

/// `memory.events` counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    /// Times usage went under memory.low pressure.
    pub low: u64,
    /// Times usage was throttled at memory.high.
    pub high: u64,
    /// Times usage reached memory.max.
    pub max: u64,
    /// Times the OOM killer was invoked.
    pub oom: u64,
    /// Processes the OOM killer killed.
    pub oom_kill: u64,
}

/// `pids.*`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PidsStats {
    /// `pids.current`.
    pub current: u64,
    /// `pids.max` (0 = no limit).
    pub limit: u64,
}

fn is_stat_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_MEMORY_STAT_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl From<StatsResponse> for Stats {
    /// From the agent's reply, which may come from a hostile guest: `memory.stat` keys that
    /// do not look like the kernel's are dropped, and at most [`MAX_MEMORY_STAT_ENTRIES`]
    /// are kept (the smallest keys, so the result does not depend on the map's order).
    fn from(r: StatsResponse) -> Self {
        let mut stat: BTreeMap<String, u64> = BTreeMap::new();
        for (key, value) in r.memory_stat {
            if !is_stat_key(&key) {
                continue;
            }
            stat.insert(key, value);
            if stat.len() > MAX_MEMORY_STAT_ENTRIES {
                stat.pop_last();
            }
        }
        let events = r.memory_events.as_ref().cloned().unwrap_or_default();
        Self {
            cpu: CpuStats {
                usage_usec: r.cpu_usage_usec,
                user_usec: r.cpu_user_usec,
                system_usec: r.cpu_system_usec,
                nr_periods: r.cpu_nr_periods,
                nr_throttled: r.cpu_nr_throttled,
                throttled_usec: r.cpu_throttled_usec,
            },
            memory: MemoryStats {
                usage_bytes: r.memory_current_bytes,
                limit_bytes: r.memory_max_bytes,
                swap_usage_bytes: r.memory_swap_current_bytes,
                swap_limit_bytes: r.memory_swap_max_bytes,
                stat,
                events: MemoryEvents {
                    low: events.low,
                    high: events.high,
                    max: events.max,
                    oom: events.oom,
                    // An agent of API 1 fills only oom_kills.
                    oom_kill: events.oom_kill.max(r.oom_kills),
                },
            },
            pids: PidsStats {
                current: r.pids_current,
                limit: r.pids_max,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brig_protocols::agent::MemoryEvents as RawEvents;

    #[test]
    fn a_reply_becomes_stats_with_the_working_set() {
        let reply = StatsResponse {
            memory_current_bytes: 10_000,
            memory_max_bytes: 64 << 20,
            cpu_usage_usec: 30,
            cpu_user_usec: 20,
            cpu_system_usec: 10,
            cpu_nr_throttled: 2,
            pids_current: 3,
            pids_max: 5,
            memory_stat: [
                ("inactive_file".to_string(), 4_000),
                ("anon".to_string(), 6_000),
            ]
            .into_iter()
            .collect(),
            memory_events: Some(RawEvents {
                max: 4,
                oom: 1,
                oom_kill: 1,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let stats = Stats::from(reply);
        assert_eq!(stats.cpu.usage_usec, 30);
        assert_eq!(stats.cpu.user_usec, 20);
        assert_eq!(stats.cpu.nr_throttled, 2);
        assert_eq!(stats.memory.limit_bytes, 64 << 20);
        assert_eq!(stats.memory.working_set_bytes(), 6_000);
        assert_eq!(stats.memory.events.oom_kill, 1);
        assert_eq!(stats.memory.events.max, 4);
        assert_eq!(
            stats.pids,
            PidsStats {
                current: 3,
                limit: 5
            }
        );
    }

    #[test]
    fn a_hostile_memory_stat_is_bounded_and_filtered() {
        let mut map: std::collections::HashMap<String, u64> =
            (0..10_000).map(|i| (format!("k{i:05}"), i)).collect();
        map.insert("\x1b]0;pwned\x07".into(), 1);
        map.insert("x".repeat(10_000), 1);
        map.insert("Anon".into(), 1);
        let stats = Stats::from(StatsResponse {
            memory_stat: map,
            ..Default::default()
        });
        assert_eq!(stats.memory.stat.len(), MAX_MEMORY_STAT_ENTRIES);
        assert!(stats.memory.stat.keys().all(|k| is_stat_key(k)));
        // The smallest keys are the ones kept, whatever order the map came in.
        assert_eq!(stats.memory.stat.keys().next().unwrap(), "k00000");
        assert_eq!(stats.memory.stat.keys().last().unwrap(), "k00127");
    }

    #[test]
    fn an_api_1_reply_still_reports_oom_kills() {
        let stats = Stats::from(StatsResponse {
            oom_kills: 2,
            ..Default::default()
        });
        assert_eq!(stats.memory.events.oom_kill, 2);
    }

    #[test]
    fn resources_come_from_oci_linux_resources() {
        let oci: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":67108864,"swap":134217728},
                "cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"0","mems":"0"},
                "pids":{"limit":5}}"#,
        )
        .unwrap();
        let r = Resources::from(&oci);
        assert_eq!(
            r,
            Resources {
                memory_limit: Some(67_108_864),
                memory_reservation: None,
                memory_swap: Some(134_217_728),
                cpu_shares: Some(512),
                cpu_quota: Some(50_000),
                cpu_period: Some(100_000),
                cpuset_cpus: Some("0".into()),
                cpuset_mems: Some("0".into()),
                pids_limit: Some(5),
            }
        );
        assert!(!r.is_empty());
        assert!(Resources::from(&LinuxResources::default()).is_empty());
    }
}

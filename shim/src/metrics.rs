//! Container statistics in containerd's cgroup v2 shape (`io.containerd.cgroups.v2.Metrics`),
//! which is what containerd's CRI and `ctr task metrics` decode on a cgroup v2 host.

use brig_runtime::resources::Stats;
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::MessageField;

/// The type URL containerd registers for the message.
pub const V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// The guest's cgroup numbers of one container as containerd's v2 metrics.
pub fn v2(stats: &Stats) -> Metrics {
    let stat = |key: &str| stats.memory.stat.get(key).copied().unwrap_or(0);
    let events = &stats.memory.events;
    Metrics {
        pids: MessageField::some(PidsStat {
            current: stats.pids.current,
            limit: stats.pids.limit,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: stats.cpu.usage_usec,
            user_usec: stats.cpu.user_usec,
            system_usec: stats.cpu.system_usec,
            nr_periods: stats.cpu.nr_periods,
            nr_throttled: stats.cpu.nr_throttled,
            throttled_usec: stats.cpu.throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            usage: stats.memory.usage_bytes,
            usage_limit: stats.memory.limit_bytes,
            swap_usage: stats.memory.swap_usage_bytes,
            swap_limit: stats.memory.swap_limit_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents {
            low: events.low,
            high: events.high,
            max: events.max,
            oom: events.oom,
            oom_kill: events.oom_kill,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::Message;

    #[test]
    fn stats_land_in_the_v2_fields_containerd_reads() {
        let mut stats = Stats::default();
        stats.memory.usage_bytes = 10 << 20;
        stats.memory.limit_bytes = 64 << 20;
        stats.memory.stat.insert("anon".into(), 4096);
        stats.memory.events.oom_kill = 1;
        stats.cpu.usage_usec = 1234;
        stats.cpu.nr_throttled = 7;
        stats.pids.current = 3;
        stats.pids.limit = 100;
        let bytes = v2(&stats).write_to_bytes().unwrap();
        let m = Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!((m.memory.usage, m.memory.usage_limit), (10 << 20, 64 << 20));
        assert_eq!(m.memory.anon, 4096);
        assert_eq!((m.cpu.usage_usec, m.cpu.nr_throttled), (1234, 7));
        assert_eq!((m.pids.current, m.pids.limit), (3, 100));
        assert_eq!(m.memory_events.oom_kill, 1);
    }
}

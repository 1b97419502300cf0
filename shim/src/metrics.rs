//! Container statistics in containerd's cgroup v2 shape (`io.containerd.cgroups.v2.Metrics`),
//! which is what containerd's CRI and `ctr task metrics` decode on a cgroup v2 host.

use brig_runtime::container::Stats;
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::protobuf::MessageField;

/// The type URL containerd registers for the message.
pub const V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// The guest's cgroup numbers of one container as containerd's v2 metrics.
pub fn v2(stats: &Stats) -> Metrics {
    Metrics {
        pids: MessageField::some(PidsStat {
            current: stats.pids_current,
            limit: stats.pids_max,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: stats.cpu_usage_usec,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: stats.memory_current_bytes,
            usage_limit: stats.memory_max_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents {
            oom_kill: stats.oom_kills,
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
        let stats = Stats {
            memory_current_bytes: 10 << 20,
            memory_max_bytes: 64 << 20,
            cpu_usage_usec: 1234,
            pids_current: 3,
            pids_max: 100,
            oom_kills: 1,
        };
        let bytes = v2(&stats).write_to_bytes().unwrap();
        let m = Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!((m.memory.usage, m.memory.usage_limit), (10 << 20, 64 << 20));
        assert_eq!(m.cpu.usage_usec, 1234);
        assert_eq!((m.pids.current, m.pids.limit), (3, 100));
        assert_eq!(m.memory_events.oom_kill, 1);
    }
}

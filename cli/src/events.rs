//! `brig events`: a container's statistics (`--stats`, once) or its OOM events (a stream),
//! as JSON objects in runc's `events` shape.

use anyhow::Context;
use brig_runtime::container::{Container, Stats};
use brig_runtime::state::Layout;
use brig_runtime::Sandbox;
use serde_json::{json, Value};

/// Arguments of `brig events`.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// Print the container's statistics once and exit, instead of following its events.
    #[arg(long)]
    stats: bool,
    /// Container ID or name.
    id: String,
}

/// The `data` of runc's stats event (times in ns, as runc gives them), plus cgroup v2's
/// memory.events under `memory.events`.
pub fn stats_json(stats: &Stats) -> Value {
    let ns = |usec: u64| usec.saturating_mul(1000);
    let m = &stats.memory;
    json!({
        "cpu": {
            "usage": {
                "total": ns(stats.cpu.usage_usec),
                "user": ns(stats.cpu.user_usec),
                "kernel": ns(stats.cpu.system_usec),
            },
            "throttling": {
                "periods": stats.cpu.nr_periods,
                "throttledPeriods": stats.cpu.nr_throttled,
                "throttledTime": ns(stats.cpu.throttled_usec),
            },
        },
        "memory": {
            "usage": { "usage": m.usage_bytes, "limit": m.limit_bytes },
            "swap": { "usage": m.swap_usage_bytes, "limit": m.swap_limit_bytes },
            "cache": m.stat.get("file").copied().unwrap_or(0),
            "workingSet": m.working_set_bytes(),
            "raw": m.stat,
            "events": {
                "low": m.events.low,
                "high": m.events.high,
                "max": m.events.max,
                "oom": m.events.oom,
                "oom_kill": m.events.oom_kill,
            },
        },
        "pids": { "current": stats.pids.current, "limit": stats.pids.limit },
    })
}

pub fn run(args: EventsArgs, layout: &Layout) -> anyhow::Result<u8> {
    let container = Container::load(layout, &args.id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sandbox = Sandbox::open(layout.root(), &container.state().sandbox_id)
            .await
            .with_context(|| format!("reaching container {}", args.id))?;
        if args.stats {
            let stats = container.stats(&sandbox).await?;
            let event = json!({ "type": "stats", "id": args.id, "data": stats_json(&stats) });
            crate::outln!("{event}")?;
            return anyhow::Ok(0);
        }
        loop {
            let id = sandbox.wait_oom().await?;
            if id == args.id && !crate::outln!("{}", json!({ "type": "oom", "id": id }))? {
                return Ok(0); // nobody reads the events any more
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use brig_runtime::resources::{MemoryEvents, PidsStats};

    #[test]
    fn stats_have_runcs_shape() {
        let mut stats = Stats::default();
        stats.cpu.usage_usec = 7;
        stats.memory.usage_bytes = 4096;
        stats.memory.limit_bytes = 64 << 20;
        stats.memory.stat.insert("file".into(), 1024);
        stats.memory.stat.insert("inactive_file".into(), 1000);
        stats.memory.events = MemoryEvents {
            oom_kill: 1,
            ..Default::default()
        };
        stats.pids = PidsStats {
            current: 2,
            limit: 5,
        };
        let v = stats_json(&stats);
        assert_eq!(v["cpu"]["usage"]["total"], 7000);
        assert_eq!(v["memory"]["usage"]["usage"], 4096);
        assert_eq!(v["memory"]["usage"]["limit"], 64 << 20);
        assert_eq!(v["memory"]["cache"], 1024);
        assert_eq!(v["memory"]["workingSet"], 3096);
        assert_eq!(v["memory"]["raw"]["inactive_file"], 1000);
        assert_eq!(v["memory"]["events"]["oom_kill"], 1);
        assert_eq!(v["pids"]["current"], 2);
        assert_eq!(v["pids"]["limit"], 5);
    }
}

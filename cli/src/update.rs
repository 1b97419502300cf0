//! `brig update`: change a running container's cgroup limits, with runc's flags.

use anyhow::Context;
use brig_runtime::container::{Container, Resources};
use brig_runtime::state::Layout;
use brig_runtime::Sandbox;

use crate::run::parse_size;

/// Arguments of `brig update`. Limits not given stay as they are.
#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// Memory limit: 64m, 1g… (-1: none).
    #[arg(short = 'm', long, value_name = "SIZE", value_parser = parse_limit, allow_hyphen_values = true)]
    memory: Option<i64>,
    /// Memory soft limit (reservation): 32m… (-1: none).
    #[arg(long, value_name = "SIZE", value_parser = parse_limit, allow_hyphen_values = true)]
    memory_reservation: Option<i64>,
    /// Memory plus swap: 128m… (-1: unlimited swap). Needs --memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_limit, allow_hyphen_values = true)]
    memory_swap: Option<i64>,
    /// CPU quota in µs per period (-1: none).
    #[arg(long, value_name = "USEC", allow_hyphen_values = true)]
    cpu_quota: Option<i64>,
    /// CPU period in µs.
    #[arg(long, value_name = "USEC")]
    cpu_period: Option<u64>,
    /// CPU shares (relative weight, 2..=262144).
    #[arg(long, value_name = "N")]
    cpu_shares: Option<u64>,
    /// CPUs the container may use: 0-2,4.
    #[arg(long, value_name = "LIST")]
    cpuset_cpus: Option<String>,
    /// Memory nodes the container may use.
    #[arg(long, value_name = "LIST")]
    cpuset_mems: Option<String>,
    /// Most processes in the container (-1: no limit).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pids_limit: Option<i64>,
    /// Container ID or name.
    id: String,
}

/// A size as `parse_size` takes it, or -1 for no limit.
fn parse_limit(s: &str) -> Result<i64, String> {
    if s.trim() == "-1" {
        return Ok(-1);
    }
    let bytes = parse_size(s)?;
    i64::try_from(bytes).map_err(|_| format!("{s:?} is too large"))
}

impl UpdateArgs {
    fn resources(&self) -> Resources {
        Resources {
            memory_limit: self.memory,
            memory_reservation: self.memory_reservation,
            memory_swap: self.memory_swap,
            cpu_shares: self.cpu_shares,
            cpu_quota: self.cpu_quota,
            cpu_period: self.cpu_period,
            cpuset_cpus: self.cpuset_cpus.clone(),
            cpuset_mems: self.cpuset_mems.clone(),
            pids_limit: self.pids_limit,
        }
    }
}

pub fn run(args: UpdateArgs, layout: &Layout) -> anyhow::Result<u8> {
    let resources = args.resources();
    if resources.is_empty() {
        anyhow::bail!("nothing to update: give at least one limit (see brig update --help)");
    }
    let container = Container::load(layout, &args.id)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sandbox = Sandbox::open(layout.root(), &container.state().sandbox_id)
            .await
            .with_context(|| format!("reaching container {}", args.id))?;
        container.update(&sandbox, &resources).await?;
        anyhow::Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_take_runc_sizes_and_minus_one() {
        assert_eq!(parse_limit("64m"), Ok(64 << 20));
        assert_eq!(parse_limit("1g"), Ok(1 << 30));
        assert_eq!(parse_limit("512M"), Ok(512 << 20));
        assert_eq!(parse_limit("-1"), Ok(-1));
        assert!(parse_limit("-2").is_err());
        assert!(parse_limit("lots").is_err());
    }
}

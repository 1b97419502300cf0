//! `brig update`: change a running container's cgroup limits, with runc's flags, or from
//! an OCI `linux.resources` JSON file (`--resources FILE`, `-` for stdin: what podman sends).

use anyhow::Context;
use brig_runtime::container::{Container, Resources};
use brig_runtime::state::Layout;
use brig_runtime::Sandbox;

use crate::run::parse_size;

/// Arguments of `brig update`. Limits not given stay as they are.
#[derive(clap::Args, Debug)]
pub struct UpdateArgs {
    /// OCI `linux.resources` JSON to apply, `-` for stdin; the flags below override it.
    #[arg(short = 'r', long, value_name = "FILE")]
    resources: Option<std::path::PathBuf>,
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
    /// The limits to set: those of `--resources`, with each flag given taking precedence.
    fn resources(&self) -> anyhow::Result<Resources> {
        let base = match &self.resources {
            Some(path) => Resources::from(&read_resources(path)?),
            None => Resources::default(),
        };
        Ok(Resources {
            memory_limit: self.memory.or(base.memory_limit),
            memory_reservation: self.memory_reservation.or(base.memory_reservation),
            memory_swap: self.memory_swap.or(base.memory_swap),
            cpu_shares: self.cpu_shares.or(base.cpu_shares),
            cpu_quota: self.cpu_quota.or(base.cpu_quota),
            cpu_period: self.cpu_period.or(base.cpu_period),
            cpuset_cpus: self.cpuset_cpus.clone().or(base.cpuset_cpus),
            cpuset_mems: self.cpuset_mems.clone().or(base.cpuset_mems),
            pids_limit: self.pids_limit.or(base.pids_limit),
        })
    }
}

/// An OCI `LinuxResources` object from `path`, or from stdin for `-`.
fn read_resources(path: &std::path::Path) -> anyhow::Result<oci_spec::runtime::LinuxResources> {
    let kind = "an OCI linux.resources object";
    if path.as_os_str() == "-" {
        return crate::read_json_arg(std::io::stdin(), "--resources", path, kind);
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("--resources {}", path.display()))?;
    crate::read_json_arg(file, "--resources", path, kind)
}

pub fn run(args: UpdateArgs, layout: &Layout) -> anyhow::Result<u8> {
    let resources = args.resources()?;
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
    fn flags_override_the_resources_file() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: UpdateArgs,
        }
        let dir = std::env::temp_dir().join(format!("brig-update-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("r.json");
        std::fs::write(
            &file,
            r#"{"memory":{"limit":67108864},"cpu":{"quota":50000,"period":100000},"pids":{"limit":99}}"#,
        )
        .unwrap();
        let parse = |extra: &[&str]| {
            let mut argv = vec!["update", "--resources", file.to_str().unwrap()];
            argv.extend_from_slice(extra);
            argv.push("box");
            Cli::parse_from(argv).args.resources().unwrap()
        };
        let r = parse(&[]);
        assert_eq!(
            (r.memory_limit, r.cpu_quota, r.cpu_period, r.pids_limit),
            (Some(64 << 20), Some(50000), Some(100000), Some(99))
        );
        let r = parse(&["--memory", "128m", "--pids-limit", "-1"]);
        assert_eq!((r.memory_limit, r.pids_limit), (Some(128 << 20), Some(-1)));
        std::fs::write(&file, "{\"memory\": 5}").unwrap();
        let err = Cli::parse_from(["update", "-r", file.to_str().unwrap(), "box"])
            .args
            .resources()
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("not an OCI linux.resources"),
            "{err:#}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

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

//! `brig kill`: send a signal to a container's init process.

use anyhow::Context;
use brig_runtime::agent::AgentClient;

use crate::state::Layout;

/// Arguments of `brig kill`.
#[derive(clap::Args, Debug)]
pub struct KillArgs {
    /// Container ID or name.
    id: String,
    /// Signal name or number (default KILL, as docker).
    #[arg(default_value = "KILL")]
    signal: String,
}

/// Parse `KILL`, `SIGKILL`, `9`.
pub fn parse_signal(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        anyhow::ensure!((1..=64).contains(&n), "signal {n} is out of range");
        return Ok(n);
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") { name } else { format!("SIG{name}") };
    name.parse::<nix::sys::signal::Signal>().map(|sig| sig as i32).map_err(|_| anyhow::anyhow!("unknown signal {s:?}"))
}

pub fn run(args: KillArgs, layout: &Layout) -> anyhow::Result<u8> {
    let signal = parse_signal(&args.signal)?;
    let state = layout.load(&args.id)?;
    anyhow::ensure!(state.status == "running", "container {} is not running", args.id);
    let uds = layout.sandbox(&args.id).join("vsock.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let agent = AgentClient::connect(&uds, std::time::Duration::from_secs(10))
            .await
            .with_context(|| format!("reaching container {}", args.id))?;
        agent.signal_process(&args.id, "", signal as u32, false).await?;
        anyhow::Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("0").is_err());
    }
}

//! `brig boot`: boot a sandbox, show the agent answering, power it off.

use anyhow::Context;
use brig_runtime::{guest_text, RuntimeConfig, Sandbox, SandboxSpec};

/// Arguments of `brig boot`.
#[derive(clap::Args, Debug)]
pub struct BootArgs {
    /// vCPUs of the microVM (default: from brig.toml, else 1).
    #[arg(long)]
    cpus: Option<u8>,
    /// Guest memory in MiB (default: from brig.toml, else 256).
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
}

pub fn run(args: BootArgs, root: Option<std::path::PathBuf>) -> anyhow::Result<u8> {
    let mut config = RuntimeConfig::load()?;
    if let Some(root) = root {
        config.root = root;
    }
    let mut spec = SandboxSpec::new(format!("boot-{}", std::process::id()), &config);
    spec.cpus = args.cpus.unwrap_or(spec.cpus);
    spec.memory_mib = args.memory.unwrap_or(spec.memory_mib);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    rt.block_on(async {
        let sandbox = Sandbox::start(&config, &spec).await?;
        let v = sandbox.agent().version().await?;
        crate::outln!(
            "agent {} (API {}) answering over vsock from a microVM: kernel {}, {} vCPU(s), {} MiB",
            guest_text::line(&v.agent_version),
            v.api_version,
            guest_text::line(&v.kernel_release),
            v.cpus_online,
            v.mem_total_kib / 1024
        )?;
        crate::outln!(
            "boot time: {} ms from VMM start to the agent's first answer (guest kernel to agent ready: {} ms)",
            sandbox.boot_time().as_millis(),
            v.boot_to_ready_ms
        )?;
        let status = sandbox.shutdown().await?;
        anyhow::ensure!(status.success(), "the VMM exited with {status} after shutdown");
        crate::outln!("microVM powered off cleanly")?;
        Ok(0)
    })
}

//! `brig port`: the ports a container publishes on the host, as `docker port` lists them.

use brig_runtime::state::Layout;

/// Arguments of `brig port`.
#[derive(clap::Args, Debug)]
pub struct PortArgs {
    /// Container ID or name.
    id: String,
}

pub fn run(args: PortArgs, layout: &Layout) -> anyhow::Result<u8> {
    let state = layout.load(&args.id)?;
    let sandbox = layout.sandbox(&state.sandbox_id);
    // A container on no bridge network, or whose sandbox is gone, publishes nothing.
    let ports = brig_runtime::sandbox::read_record(&sandbox)
        .ok()
        .and_then(|r| r.cni)
        .map(|cni| cni.ports)
        .unwrap_or_default();
    for port in ports {
        if !crate::outln!("{port}")? {
            break;
        }
    }
    Ok(0)
}

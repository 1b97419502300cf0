//! `brig state`: a container's state as the OCI runtime spec words it, in JSON.

use brig_runtime::state::{Layout, Status};

/// The OCI runtime spec version the state document follows.
const OCI_VERSION: &str = "1.0.2";

/// Arguments of `brig state`.
#[derive(clap::Args, Debug)]
pub struct StateArgs {
    /// Container ID.
    id: String,
}

/// Prints `ociVersion`, `id`, `status`, `pid` (the process that stands for the container on
/// the host while it lives; 0 once stopped), `bundle` and `annotations`. An unknown ID is an
/// error that says "does not exist", as runc's (engines such as podman read those words).
pub fn run(args: StateArgs, layout: &Layout) -> anyhow::Result<u8> {
    let state = layout.load(&args.id)?;
    let pid = match state.status {
        Status::Stopped => 0,
        _ => state.owner.map(|o| o.pid).unwrap_or(0),
    };
    let doc = serde_json::json!({
        "ociVersion": OCI_VERSION,
        "id": state.id,
        "status": state.status.as_str(),
        "pid": pid,
        "bundle": state.bundle.unwrap_or_default(),
        "annotations": state.annotations,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(0)
}

//! `brig state`: a container's state as the OCI runtime spec words it, in JSON.

use brig_runtime::state::{ContainerState, Layout, Status};

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
    crate::outln!("{}", serde_json::to_string_pretty(&document(&state))?)?;
    Ok(0)
}

/// The OCI state document of a container (also what its hooks read on stdin).
pub(crate) fn document(state: &ContainerState) -> serde_json::Value {
    let pid = match state.status {
        Status::Stopped => 0,
        _ => state.owner.as_ref().map(|o| o.pid).unwrap_or(0),
    };
    serde_json::json!({
        "ociVersion": OCI_VERSION,
        "id": state.id,
        "status": state.status.as_str(),
        "pid": pid,
        "bundle": state.bundle.clone().unwrap_or_default(),
        "annotations": state.annotations,
    })
}

//! `containerd-shim-brig-v2`: the containerd shim v2 (task API v2, as containerd 1.6/1.7
//! speak it) for Brig. One shim process serves one pod: every container of a pod runs in the
//! pod's one microVM, through the runtime core (`brig-runtime`).
//!
//! containerd runs the binary three ways (see containerd's runtime/v2/README.md):
//! - `start`: find or spawn the shim that serves this container's pod and print its socket
//!   address (only the address: containerd reads stdout and stderr together);
//! - `delete`: clean up after a shim that is gone (its VM, mounts, records);
//! - no action (`-socket ADDR`): serve the task API. Spawned by `start`, never by containerd.

mod bootstrap;
mod io;
mod metrics;
mod options;
mod task;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let flags = match containerd_shim::parse(&args) {
        Ok(flags) => flags,
        Err(e) => {
            eprintln!("containerd-shim-brig-v2: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("containerd-shim-brig-v2 {}", env!("CARGO_PKG_VERSION"));
        println!("  task API v2 (containerd 1.6, 1.7)");
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_str() {
        "start" => bootstrap::start(&flags),
        "delete" => bootstrap::delete(&flags),
        "" => bootstrap::serve(&flags),
        other => Err(anyhow::anyhow!(
            "unknown action {other:?}: containerd runs this shim with `start`, `delete`, or none"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // containerd shows what `start` and `delete` print on failure.
            eprintln!("containerd-shim-brig-v2: {e:#}");
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `brig rm`: forget a container; `-f` stops it first.

use brig_runtime::share;

use crate::state::{alive, Layout};

/// Arguments of `brig rm`.
#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// Stop the container if it is running (its microVM is killed).
    #[arg(short = 'f', long)]
    force: bool,
    /// Container IDs or names.
    #[arg(required = true)]
    ids: Vec<String>,
}

pub fn run(args: RmArgs, layout: &Layout) -> anyhow::Result<u8> {
    for id in &args.ids {
        let state = layout.load(id)?;
        if state.status == "running" {
            anyhow::ensure!(args.force, "container {id} is running: stop it first, or use brig rm -f");
            // Kill the microVM first (the container dies with it), then its owner.
            for pid in [state.vmm_pid, state.monitor_pid] {
                if pid != 0 && alive(pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
                }
            }
            // Until both are gone from the process table, not only dead: killed together, the
            // VMM outlives its owner as a zombie until init reaps it.
            let gone = |pid: u32| pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !(gone(state.vmm_pid) && gone(state.monitor_pid)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        // The owner may have died before cleaning up: unmount and remove its sandbox here.
        share::remove(&layout.sandbox(id))?;
        std::fs::remove_dir_all(layout.container(id))?;
        println!("{id}");
    }
    Ok(0)
}

//! `brig-bench`: benchmarks of Brig against its peers, each run in one host session (one
//! lab boot), printing a markdown report on stdout.
//!
//! - `boot`: `brig-vmm` against QEMU microvm: process start → agent's first vsock answer,
//!   and the VMM's own memory.
//! - `run`: `brig run --rm ROOTFS true` split into boot and the rest, next to `runc run`;
//!   idle guest memory and the sandbox's host memory.
//! - `fs`: brig-vmm's in-process virtio-fs against QEMU + virtiofsd (each cache mode) and the
//!   host itself: sequential read and write, list + stat, create and unlink.
//! - `net-peer`: a pod's guest in QEMU with vhost-net, virtiofsd and vhost-vsock, wired into
//!   a pod's network namespace as Brig wires its own: the peer of `make bench-net`.

mod boot;
mod fs;
mod net_peer;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "Brig benchmarks (reports, not pass/fail tests)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot time and VMM memory against QEMU microvm.
    Boot(boot::Args),
    /// Container run time against runc, and sandbox memory.
    Run(run::Args),
    /// virtio-fs against QEMU + virtiofsd and the host itself.
    Fs(fs::Args),
    /// The QEMU peer of the network benchmark: a pod's guest in QEMU with vhost-net.
    NetPeer(net_peer::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Boot(args) => boot::run(args),
        Command::Run(args) => run::run(args),
        Command::Fs(args) => fs::run(args),
        Command::NetPeer(args) => net_peer::run(args),
    }
}

/// Median of `values` (NaN when empty).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

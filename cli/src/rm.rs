//! `brig rm`: forget a container; `-f` stops it first.

use brig_runtime::container::Container;
use brig_runtime::state::Layout;

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
        Container::load(layout, id)?.delete(args.force)?;
        crate::outln!("{id}")?;
    }
    Ok(0)
}

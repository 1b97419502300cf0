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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for id in &args.ids {
        let container = Container::load(layout, id)?;
        // A container run from a bundle gets its poststop hooks, as with `brig delete`.
        rt.block_on(crate::delete::delete_with_hooks(
            layout, container, args.force, args.force,
        ))?;
        crate::outln!("{id}")?;
    }
    Ok(0)
}

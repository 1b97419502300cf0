//! `brig logs`: what a detached container wrote.

use brig_runtime::state::Layout;

/// Arguments of `brig logs`.
#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// Container ID or name.
    id: String,
}

pub fn run(args: LogsArgs, layout: &Layout) -> anyhow::Result<u8> {
    layout.load(&args.id)?;
    let dir = layout.container(&args.id);
    let out = std::fs::read(dir.join("stdout.log")).unwrap_or_default();
    let err = std::fs::read(dir.join("stderr.log")).unwrap_or_default();
    use std::io::Write;
    std::io::stdout().write_all(&out)?;
    std::io::stderr().write_all(&err)?;
    Ok(0)
}

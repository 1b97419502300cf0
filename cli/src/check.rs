//! `brig check`.

use std::path::Path;

use brig_runtime::host;

/// Arguments of `brig check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {}

pub fn run(_args: CheckArgs) -> anyhow::Result<u8> {
    let report = host::inspect(Path::new("/"));
    for fact in &report.facts {
        crate::outln!(
            "{:<11} {:<4} {}",
            fact.name,
            if fact.ok { "ok" } else { "FAIL" },
            fact.detail
        )?;
    }
    if report.can_boot_guests() {
        crate::outln!("brig can boot microVMs on this host")?;
        Ok(0)
    } else {
        crate::outln!("brig cannot boot its guest kernel directly on this host (see kvm above)")?;
        Ok(1)
    }
}

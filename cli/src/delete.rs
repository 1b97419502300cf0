//! `brig delete`: the OCI runtime CLI's removal of a container, as runc's: a created or
//! stopped one at once, a running one only with `--force` (its microVM is killed).
//!
//! A pod's sandbox container goes with its microVM, so only once the containers that joined
//! it are deleted (as CRI-O and runc-like engines do it): otherwise the error names them, and
//! `--force` deletes them too (each with its poststop hooks). Deleting a member leaves the
//! microVM running.

use brig_runtime::container::Container;
use brig_runtime::state::{ContainerState, Layout, Status};

/// Arguments of `brig delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// Delete a running container too (its microVM is killed), and a pod sandbox's
    /// containers with it.
    #[arg(short = 'f', long)]
    force: bool,
    /// Container ID.
    id: String,
}

pub fn run(args: DeleteArgs, layout: &Layout) -> anyhow::Result<u8> {
    let container = Container::load(layout, &args.id)?;
    let status = container.state().status;
    anyhow::ensure!(
        args.force || !matches!(status, Status::Running | Status::Paused),
        "container {} is {}: stop it first, or use --force",
        args.id,
        status.as_str()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(delete_with_hooks(layout, container, true, args.force))?;
    Ok(0)
}

/// Delete `container` (`force`: a running one too; `with_members`: a pod's sandbox container
/// with the containers that joined it, those first), then run the poststop hooks from the
/// bundle of each container it removed, in the same order.
pub(crate) async fn delete_with_hooks(
    layout: &Layout,
    container: Container,
    force: bool,
    with_members: bool,
) -> anyhow::Result<()> {
    let state = container.state().clone();
    let mut going: Vec<ContainerState> = if with_members {
        brig_runtime::pod::members(layout, &state.id, &state.sandbox_id)
            .iter()
            .filter_map(|id| layout.load(id).ok())
            .collect()
    } else {
        Vec::new()
    };
    going.push(state);
    container.delete(force, with_members).await?;
    for state in going {
        if let Some(bundle) = state.bundle.clone() {
            crate::hooks::HostHooks::of_bundle(&bundle)
                .poststop(state)
                .await;
        }
    }
    Ok(())
}

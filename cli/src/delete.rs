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
    let deleted = going(layout, container.state(), args.force);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(container.delete(true, args.force))?;
    for state in deleted {
        poststop(state);
    }
    Ok(0)
}

/// What deleting the container of `state` removes, in order: with `force`, the members of
/// a pod's sandbox container first, then the container itself.
pub(crate) fn going(layout: &Layout, state: &ContainerState, force: bool) -> Vec<ContainerState> {
    let mut going: Vec<ContainerState> = if force {
        brig_runtime::pod::members(layout, &state.id, &state.sandbox_id)
            .iter()
            .filter_map(|id| layout.load(id).ok())
            .collect()
    } else {
        Vec::new()
    };
    going.push(state.clone());
    going
}

/// The poststop hooks from a deleted container's bundle config; a failing one is a warning
/// (the spec's rule): the container stays deleted.
pub(crate) fn poststop(mut state: ContainerState) {
    let Some(bundle) = state.bundle.clone() else {
        return;
    };
    state.status = Status::Stopped;
    let hooks = brig_runtime::spec::load_target(&bundle)
        .ok()
        .and_then(|target| target.spec.hooks().clone());
    let document = crate::state::document(&state);
    if let Err(e) = crate::hooks::run(
        hooks.as_ref(),
        crate::hooks::Moment::Deleted,
        &document,
        None,
    ) {
        eprintln!("brig: warning: {e:#}");
    }
}

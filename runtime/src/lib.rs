//! Brig's host core: configuration, sandbox (microVM) lifecycle, control of the `brig-vmm`
//! process, and the client of the guest agent.
//!
//! The adapters (`brig` CLI, later the containerd shim) stay thin and call into this crate:
//! the records of sandboxes and containers ([`state`]), the container lifecycle
//! ([`container`]) and the sandbox's ([`sandbox`]) all live here.

// Guest values are narrowed by checked conversions, never by `as` (issue 8).
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

pub mod agent;
pub mod cgroup;
pub mod cni;
pub mod config;
pub mod container;
pub mod guest_text;
pub mod host;
pub mod hybrid_vsock;
pub mod net;
pub mod pod;
pub mod resources;
pub mod rootfs;
pub mod sandbox;
pub mod share;
pub mod signal;
pub mod spec;
pub mod state;

pub use config::RuntimeConfig;
pub use sandbox::{Sandbox, SandboxSpec};

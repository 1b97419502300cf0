//! Brig's host core: configuration, sandbox (microVM) lifecycle, control of the `brig-vmm`
//! process, and the client of the guest agent.
//!
//! The adapters (`brig` CLI, later the containerd shim) stay thin and call into this crate.

pub mod agent;
pub mod config;
pub mod container;
pub mod host;
pub mod hybrid_vsock;
pub mod sandbox;
pub mod spec;
pub mod share;

pub use config::RuntimeConfig;
pub use sandbox::{Sandbox, SandboxSpec};

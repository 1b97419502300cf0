//! The Brig agent API, shared by the host runtime and the guest agent.
//!
//! `agent.proto` is the source of truth; the Rust code in `src/generated/` is produced from it
//! by `cargo run -p brig-protocols-codegen` and checked in.
//!
//! - [`agent`]: the protobuf messages (`VersionRequest`, `VersionResponse`, …).
//! - [`agent_ttrpc`]: the sync client (`AgentClient`) and server trait (`Agent`,
//!   `create_agent`), used by the guest agent.
//! - `agent_ttrpc_async` (feature `async`): the tokio client (`AgentClient`) and server trait,
//!   used by the host runtime.
//!
//! The host reaches the agent on vsock port [`AGENT_VSOCK_PORT`].

/// Protobuf messages of the `brig.agent.v1` package.
#[path = "generated/agent.rs"]
pub mod agent;

/// Sync ttrpc client and server for the `brig.agent.v1.Agent` service.
#[path = "generated/agent_ttrpc.rs"]
pub mod agent_ttrpc;

/// Async (tokio) ttrpc client and server for the `brig.agent.v1.Agent` service.
#[cfg(feature = "async")]
#[path = "generated/agent_ttrpc_async.rs"]
pub mod agent_ttrpc_async;

/// The guest vsock port on which brig-agent serves the ttrpc API.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The agent API version reported in `VersionResponse.api_version`.
pub const AGENT_API_VERSION: u32 = 4;

/// The annotation the host adds to a container's spec when it has `startContainer` hooks:
/// the bundle's path on the host, which those hooks read in the state on their stdin (they
/// run in the guest, which has no bundle of its own). The agent leaves it out of the
/// annotations the hooks see.
pub const BUNDLE_ANNOTATION: &str = "io.brig.bundle";

pub mod features;
pub mod vsock_self_test;

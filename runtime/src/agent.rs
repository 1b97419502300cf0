//! Client of the guest agent: ttrpc over a hybrid-vsock connection to guest port 1024.

use std::path::Path;
use std::time::Duration;

use brig_protocols::agent::{ShutdownRequest, VersionRequest, VersionResponse, VsockSelfTestRequest, VsockSelfTestResponse};
use brig_protocols::agent_ttrpc_async::AgentClient as RawClient;
use brig_protocols::AGENT_VSOCK_PORT;

use crate::hybrid_vsock::{self, ConnectError};

/// How long one control call may take before it is an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The vsock connection could not be made.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A call failed (the agent's own message, or a transport error).
    #[error("agent call {call} failed: {reason}")]
    Call { call: &'static str, reason: String },
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    raw: RawClient,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64)
}

fn call_err(call: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |e| {
        let reason = match e {
            ttrpc::Error::RpcStatus(status) => status.message().to_string(),
            other => other.to_string(),
        };
        AgentError::Call { call, reason }
    }
}

impl AgentClient {
    /// Connect through the VMM's vsock socket `uds` (one attempt).
    pub async fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = hybrid_vsock::connect(uds, AGENT_VSOCK_PORT, timeout).await?;
        let socket = ttrpc::asynchronous::transport::Socket::new(stream);
        let client = ttrpc::asynchronous::Client::new(socket);
        Ok(Self { raw: RawClient::new(client) })
    }

    /// The agent's identity and basic guest facts.
    pub async fn version(&self) -> Result<VersionResponse, AgentError> {
        self.raw.version(ctx(), &VersionRequest::new()).await.map_err(call_err("Version"))
    }

    /// Ask the guest to power off; the VMM exits once it has.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.raw.shutdown(ctx(), &ShutdownRequest::new()).await.map(|_| ()).map_err(call_err("Shutdown"))
    }

    /// Diagnostics: the agent connects to host vsock `port`, sends `send_bytes` pattern
    /// bytes and reads until EOF.
    pub async fn vsock_self_test(&self, port: u32, send_bytes: u64) -> Result<VsockSelfTestResponse, AgentError> {
        let mut req = VsockSelfTestRequest::new();
        req.port = port;
        req.send_bytes = send_bytes;
        self.raw.vsock_self_test(ctx(), &req).await.map_err(call_err("VsockSelfTest"))
    }
}

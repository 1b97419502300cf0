//! Client of the guest agent: ttrpc over a hybrid-vsock connection to guest port 1024.

use std::path::Path;
use std::time::Duration;

use brig_protocols::agent::{
    CloseStdinRequest, CreateContainerRequest, ExecProcessRequest, ListProcessesRequest, ProcessInfo,
    RemoveContainerRequest, ResizeTtyRequest, ShutdownRequest, SignalProcessRequest, StartContainerRequest,
    StatsRequest, StatsResponse, StdioPorts, VersionRequest, VersionResponse, VsockSelfTestRequest,
    VsockSelfTestResponse, WaitProcessRequest, WaitProcessResponse,
};
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
    #[error("{reason}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// The ttrpc status code (`Code::UNKNOWN` for transport errors).
        code: ttrpc::Code,
        /// The agent's message.
        reason: String,
    },
}

impl AgentError {
    /// The ttrpc status code of a failed call.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentError::Call { code, .. } => Some(*code),
            AgentError::Connect(_) => None,
        }
    }
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
        let (code, reason) = match e {
            ttrpc::Error::RpcStatus(status) => (status.code(), status.message().to_string()),
            other => (ttrpc::Code::UNKNOWN, format!("agent call {call} failed: {other}")),
        };
        AgentError::Call { call, code, reason }
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

    /// Wrap a ttrpc client that already reaches the agent some other way (e.g.
    /// `vsock://CID:1024` over AF_VSOCK, to a guest of another VMM).
    pub fn from_ttrpc(client: ttrpc::asynchronous::Client) -> Self {
        Self { raw: RawClient::new(client) }
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

    /// Set up a container (its command waits for [`Self::start_container`]).
    pub async fn create_container(&self, id: &str, spec_json: String, rootfs: String, stdio: StdioPorts) -> Result<u32, AgentError> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec_json,
            rootfs,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.raw.create_container(ctx(), &req).await.map(|r| r.pid).map_err(call_err("CreateContainer"))
    }

    /// Let a created container run its command.
    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let req = StartContainerRequest { container_id: id.into(), ..Default::default() };
        self.raw.start_container(ctx(), &req).await.map(|_| ()).map_err(call_err("StartContainer"))
    }

    /// Run another process in a container.
    pub async fn exec_process(&self, id: &str, exec_id: &str, process_json: String, stdio: StdioPorts) -> Result<(), AgentError> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.raw.exec_process(ctx(), &req).await.map(|_| ()).map_err(call_err("ExecProcess"))
    }

    /// Send `signal` to a process (`exec_id` empty = the container's init; `all` = every
    /// process of the container).
    pub async fn signal_process(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), AgentError> {
        let req = SignalProcessRequest { container_id: id.into(), exec_id: exec_id.into(), signal, all, ..Default::default() };
        self.raw.signal_process(ctx(), &req).await.map(|_| ()).map_err(call_err("SignalProcess"))
    }

    /// Wait for a process to exit (no timeout: processes run as long as they like).
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> Result<WaitProcessResponse, AgentError> {
        let req = WaitProcessRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.raw.wait_process(ttrpc::context::Context::default(), &req).await.map_err(call_err("WaitProcess"))
    }

    /// Close a process's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = CloseStdinRequest { container_id: id.into(), exec_id: exec_id.into(), ..Default::default() };
        self.raw.close_stdin(ctx(), &req).await.map(|_| ()).map_err(call_err("CloseStdin"))
    }

    /// Set a process's terminal size.
    pub async fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<(), AgentError> {
        let req = ResizeTtyRequest { container_id: id.into(), exec_id: exec_id.into(), rows, cols, ..Default::default() };
        self.raw.resize_tty(ctx(), &req).await.map(|_| ()).map_err(call_err("ResizeTty"))
    }

    /// The processes of a container.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, AgentError> {
        let req = ListProcessesRequest { container_id: id.into(), ..Default::default() };
        self.raw.list_processes(ctx(), &req).await.map(|r| r.processes).map_err(call_err("ListProcesses"))
    }

    /// cgroup statistics of a container.
    pub async fn stats(&self, id: &str) -> Result<StatsResponse, AgentError> {
        let req = StatsRequest { container_id: id.into(), ..Default::default() };
        self.raw.stats(ctx(), &req).await.map_err(call_err("Stats"))
    }

    /// Kill what is left of a container and forget it.
    pub async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        let req = RemoveContainerRequest { container_id: id.into(), ..Default::default() };
        self.raw.remove_container(ctx(), &req).await.map(|_| ()).map_err(call_err("RemoveContainer"))
    }
}

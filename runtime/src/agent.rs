//! Client of the guest agent: ttrpc over a hybrid-vsock connection to guest port 1024.

use std::path::Path;
use std::time::Duration;

use brig_protocols::agent::{
    CloseStdinRequest, CreateContainerRequest, ExecProcessRequest, LinuxResources,
    ListProcessesRequest, PauseContainerRequest, ProcessInfo, RemoveContainerRequest,
    ResizeTtyRequest, ResumeContainerRequest, ShutdownRequest, SignalProcessRequest,
    StartContainerRequest, StatsRequest, StatsResponse, StdioPorts, UpdateContainerRequest,
    VersionRequest, VersionResponse, VsockSelfTestRequest, VsockSelfTestResponse,
    WaitOomEventRequest, WaitProcessRequest, WaitProcessResponse,
};
use brig_protocols::agent_ttrpc_async::AgentClient as RawClient;
use brig_protocols::{AGENT_API_VERSION, AGENT_VSOCK_PORT};

use crate::guest_text;
use crate::hybrid_vsock::{self, ConnectError};
use crate::resources::Resources;
use crate::state::validate_id;

/// How long one control call may take before it is an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long PauseContainer may take: the agent itself gives up on a freeze after 10 s.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(40);

/// What kind of failure an agent call had, in the runtime's own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The thing named does not exist (for CreateContainer/ExecProcess: the command).
    NotFound,
    /// Not allowed (for CreateContainer/ExecProcess: the command is not executable).
    PermissionDenied,
    /// The request was wrong.
    InvalidArgument,
    /// The thing exists already.
    AlreadyExists,
    /// The object is not in a state that allows the call.
    FailedPrecondition,
    /// The connection failed or the call timed out.
    Transport,
    /// Anything else the agent reported.
    Other,
}

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
        /// What kind of failure.
        kind: ErrorKind,
        /// The agent's message.
        reason: String,
    },
    /// Host and guest speak different versions of the agent API.
    #[error(
        "the guest agent (brig-agent {agent_version}) speaks agent API version {guest}, this runtime speaks {host}: \
         use the initramfs built with this brig (make initramfs, or `initrd =` in brig.toml)"
    )]
    Version {
        /// The runtime's version.
        host: u32,
        /// The agent's version.
        guest: u32,
        /// The agent's crate version.
        agent_version: String,
    },
}

impl AgentError {
    /// The kind of a failed call (`None` when no call was made).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            AgentError::Call { kind, .. } => Some(*kind),
            AgentError::Connect(_) | AgentError::Version { .. } => None,
        }
    }
}

/// A connected agent.
#[derive(Clone)]
pub struct AgentClient {
    raw: RawClient,
}

/// A ttrpc timeout: `d` in nanoseconds (saturated).
fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(nanos(CALL_TIMEOUT))
}

fn call_err(call: &'static str) -> impl FnOnce(ttrpc::Error) -> AgentError {
    move |e| {
        let (kind, reason) = match e {
            ttrpc::Error::RpcStatus(status) => {
                let kind = match status.code() {
                    ttrpc::Code::NOT_FOUND => ErrorKind::NotFound,
                    ttrpc::Code::PERMISSION_DENIED => ErrorKind::PermissionDenied,
                    ttrpc::Code::INVALID_ARGUMENT => ErrorKind::InvalidArgument,
                    ttrpc::Code::ALREADY_EXISTS => ErrorKind::AlreadyExists,
                    ttrpc::Code::FAILED_PRECONDITION => ErrorKind::FailedPrecondition,
                    // DEADLINE_EXCEEDED is ttrpc's timeout, or the agent's own (a freeze
                    // that did not finish, with its message saying so).
                    ttrpc::Code::DEADLINE_EXCEEDED | ttrpc::Code::UNAVAILABLE => {
                        ErrorKind::Transport
                    }
                    _ => ErrorKind::Other,
                };
                (kind, guest_text::line(status.message()))
            }
            other => (
                ErrorKind::Transport,
                format!("agent call {call} failed: {other}"),
            ),
        };
        AgentError::Call { call, kind, reason }
    }
}

impl AgentClient {
    /// Connect through the VMM's vsock socket `uds` (one attempt).
    pub async fn connect(uds: &Path, timeout: Duration) -> Result<Self, AgentError> {
        let stream = hybrid_vsock::connect(uds, AGENT_VSOCK_PORT, timeout).await?;
        let socket = ttrpc::asynchronous::transport::Socket::new(stream);
        let client = ttrpc::asynchronous::Client::new(socket);
        Ok(Self {
            raw: RawClient::new(client),
        })
    }

    /// Wrap a ttrpc client that already reaches the agent some other way (e.g.
    /// `vsock://CID:1024` over AF_VSOCK, to a guest of another VMM).
    pub fn from_ttrpc(client: ttrpc::asynchronous::Client) -> Self {
        Self {
            raw: RawClient::new(client),
        }
    }

    /// The agent's identity and basic guest facts.
    pub async fn version(&self) -> Result<VersionResponse, AgentError> {
        self.raw
            .version(ctx(), &VersionRequest::new())
            .await
            .map_err(call_err("Version"))
    }

    /// The agent's version, checked: an agent whose API version is not this runtime's is
    /// an error that says so (and how to fix it), never a confusing failure later.
    pub async fn checked_version(&self) -> Result<VersionResponse, AgentError> {
        let v = self.version().await?;
        if v.api_version != AGENT_API_VERSION {
            return Err(AgentError::Version {
                host: AGENT_API_VERSION,
                guest: v.api_version,
                agent_version: guest_text::line(&v.agent_version),
            });
        }
        Ok(v)
    }

    /// Ask the guest to power off; the VMM exits once it has.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        self.raw
            .shutdown(ctx(), &ShutdownRequest::new())
            .await
            .map(|_| ())
            .map_err(call_err("Shutdown"))
    }

    /// Diagnostics: the agent connects to host vsock `port`, sends `send_bytes` pattern
    /// bytes and reads until EOF.
    pub async fn vsock_self_test(
        &self,
        port: u32,
        send_bytes: u64,
    ) -> Result<VsockSelfTestResponse, AgentError> {
        let mut req = VsockSelfTestRequest::new();
        req.port = port;
        req.send_bytes = send_bytes;
        self.raw
            .vsock_self_test(ctx(), &req)
            .await
            .map_err(call_err("VsockSelfTest"))
    }

    /// Set up a container (its command waits for [`Self::start_container`]).
    pub async fn create_container(
        &self,
        id: &str,
        spec_json: String,
        rootfs: String,
        stdio: StdioPorts,
    ) -> Result<u32, AgentError> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec_json,
            rootfs,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.raw
            .create_container(ctx(), &req)
            .await
            .map(|r| r.pid)
            .map_err(call_err("CreateContainer"))
    }

    /// Let a created container run its command.
    pub async fn start_container(&self, id: &str) -> Result<(), AgentError> {
        let req = StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.raw
            .start_container(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("StartContainer"))
    }

    /// Run another process in a container.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process_json: String,
        stdio: StdioPorts,
    ) -> Result<(), AgentError> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.raw
            .exec_process(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("ExecProcess"))
    }

    /// Send `signal` to a process (`exec_id` empty = the container's init; `all` = every
    /// process of the container).
    pub async fn signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.raw
            .signal_process(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("SignalProcess"))
    }

    /// Wait for a process to exit (no timeout: processes run as long as they like).
    pub async fn wait_process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse, AgentError> {
        let req = WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.raw
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
            .map_err(call_err("WaitProcess"))
    }

    /// Close a process's stdin.
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        let req = CloseStdinRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.raw
            .close_stdin(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("CloseStdin"))
    }

    /// Set a process's terminal size.
    pub async fn resize_tty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = ResizeTtyRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.raw
            .resize_tty(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("ResizeTty"))
    }

    /// The processes of a container.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>, AgentError> {
        let req = ListProcessesRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.raw
            .list_processes(ctx(), &req)
            .await
            .map(|r| r.processes)
            .map_err(call_err("ListProcesses"))
    }

    /// cgroup statistics of a container.
    pub async fn stats(&self, id: &str) -> Result<StatsResponse, AgentError> {
        let req = StatsRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.raw.stats(ctx(), &req).await.map_err(call_err("Stats"))
    }

    /// Freeze every process of a container; returns once the guest kernel says it is frozen.
    pub async fn pause_container(&self, id: &str) -> Result<(), AgentError> {
        let req = PauseContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.raw
            .pause_container(ttrpc::context::with_timeout(nanos(PAUSE_TIMEOUT)), &req)
            .await
            .map(|_| ())
            .map_err(call_err("PauseContainer"))
    }

    /// Thaw a paused container.
    pub async fn resume_container(&self, id: &str) -> Result<(), AgentError> {
        let req = ResumeContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.raw
            .resume_container(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("ResumeContainer"))
    }

    /// Change a container's cgroup limits (what `resources` leaves `None` stays).
    pub async fn update_container(
        &self,
        id: &str,
        resources: &Resources,
    ) -> Result<(), AgentError> {
        let req = UpdateContainerRequest {
            container_id: id.into(),
            resources: Some(LinuxResources {
                memory_limit: resources.memory_limit,
                memory_reservation: resources.memory_reservation,
                memory_swap: resources.memory_swap,
                cpu_shares: resources.cpu_shares,
                cpu_quota: resources.cpu_quota,
                cpu_period: resources.cpu_period,
                cpuset_cpus: resources.cpuset_cpus.clone(),
                cpuset_mems: resources.cpuset_mems.clone(),
                pids_limit: resources.pids_limit,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.raw
            .update_container(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("UpdateContainer"))
    }

    /// Wait (without a timeout) until a container of the sandbox is OOM-killed; returns its
    /// ID. Each kill is reported once, to one caller. An ID that is not a valid container ID
    /// (a hostile guest's) is an error, never passed on.
    pub async fn wait_oom_event(&self) -> Result<String, AgentError> {
        let reply = self
            .raw
            .wait_oom_event(
                ttrpc::context::Context::default(),
                &WaitOomEventRequest::new(),
            )
            .await
            .map_err(call_err("WaitOomEvent"))?;
        validate_id("container", &reply.container_id).map_err(|_| AgentError::Call {
            call: "WaitOomEvent",
            kind: ErrorKind::Other,
            reason: format!(
                "the agent named an invalid container id: {}",
                guest_text::line(&reply.container_id.chars().take(80).collect::<String>())
            ),
        })?;
        Ok(reply.container_id)
    }

    /// Kill what is left of a container and forget it.
    /// Configure the guest's network as the pod's (see `net`): its interface (found by MAC),
    /// routes and static neighbours.
    pub async fn configure_network(&self, pod: &crate::net::PodNetwork) -> Result<(), AgentError> {
        use brig_protocols::agent as pb;
        let net = |n: &crate::net::IpNet| pb::IpNet {
            address: n.address.to_string(),
            prefix: n.prefix.into(),
            ..Default::default()
        };
        let text = |ip: Option<std::net::IpAddr>| ip.map(|i| i.to_string()).unwrap_or_default();
        let nic = &pod.interface;
        let req = pb::ConfigureNetworkRequest {
            interfaces: vec![pb::Interface {
                mac: nic.mac.to_vec(),
                name: nic.name.clone(),
                mtu: nic.mtu,
                addresses: nic.addresses.iter().map(net).collect(),
                ..Default::default()
            }],
            routes: pod
                .routes
                .iter()
                .map(|r| pb::Route {
                    destination: r.destination.as_ref().map(net).into(),
                    gateway: text(r.gateway),
                    device: nic.name.clone(),
                    source: text(r.source),
                    scope: r.scope.into(),
                    ..Default::default()
                })
                .collect(),
            neighbors: pod
                .neighbors
                .iter()
                .map(|n| pb::Neighbor {
                    address: n.address.to_string(),
                    mac: n.mac.to_vec(),
                    device: nic.name.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.raw
            .configure_network(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("ConfigureNetwork"))
    }

    pub async fn remove_container(&self, id: &str) -> Result<(), AgentError> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.raw
            .remove_container(ctx(), &req)
            .await
            .map(|_| ())
            .map_err(call_err("RemoveContainer"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use brig_protocols::agent::{VersionRequest, VersionResponse};
    use brig_protocols::agent_ttrpc_async::{create_agent, Agent};

    use super::*;

    #[test]
    fn an_agent_message_with_terminal_escapes_becomes_visible_text() {
        // A guest whose agent was replaced answers with raw escape sequences.
        let status = ttrpc::get_status(ttrpc::Code::NOT_FOUND, "no \x1b]0;pwned\x07 here\n");
        let err = call_err("CreateContainer")(ttrpc::Error::RpcStatus(status));
        assert_eq!(err.kind(), Some(ErrorKind::NotFound));
        assert_eq!(err.to_string(), "no \\x1b]0;pwned\\x07 here\\x0a");
    }

    /// A peer that answers Version with a given API version, as an agent of another build
    /// would.
    struct OtherBuild(u32);

    #[async_trait::async_trait]
    impl Agent for OtherBuild {
        async fn version(
            &self,
            _: &::ttrpc::r#async::TtrpcContext,
            _: VersionRequest,
        ) -> ::ttrpc::Result<VersionResponse> {
            Ok(VersionResponse {
                agent_version: "9.9.9".into(),
                api_version: self.0,
                ..Default::default()
            })
        }
    }

    /// A guest whose WaitOomEvent names whatever it is given.
    struct OomNamer(String);

    #[async_trait::async_trait]
    impl Agent for OomNamer {
        async fn wait_oom_event(
            &self,
            _: &::ttrpc::r#async::TtrpcContext,
            _: brig_protocols::agent::WaitOomEventRequest,
        ) -> ::ttrpc::Result<brig_protocols::agent::WaitOomEventResponse> {
            Ok(brig_protocols::agent::WaitOomEventResponse {
                container_id: self.0.clone(),
                oom_kills: 1,
                ..Default::default()
            })
        }
    }

    #[tokio::test]
    async fn an_oom_event_naming_a_bad_container_id_is_refused() {
        for (name, id, ok) in [
            ("oom-good", "web-1".to_string(), true),
            ("oom-path", "../../etc".to_string(), false),
            ("oom-long", "a".repeat(100_000), false),
            ("oom-esc", "x\x1b]0;t\x07".to_string(), false),
        ] {
            let path = std::env::temp_dir().join(format!(
                "brig-agent-test-{name}-{}.sock",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&path);
            let addr = format!("unix://{}", path.display());
            let mut server = ttrpc::asynchronous::Server::new()
                .bind(&addr)
                .unwrap()
                .register_service(create_agent(Arc::new(OomNamer(id.clone()))));
            server.start().await.unwrap();
            let client = ttrpc::asynchronous::Client::connect(&addr).await.unwrap();
            let agent = AgentClient::from_ttrpc(client);
            match agent.wait_oom_event().await {
                Ok(got) => assert!(ok && got == id, "{name}: accepted {got:?}"),
                Err(e) => {
                    assert!(!ok, "{name}: {e}");
                    let msg = e.to_string();
                    assert!(msg.contains("invalid container id"), "{msg}");
                    assert!(msg.len() < 400 && !msg.contains('\x1b'), "{name}: {msg}");
                }
            }
            let _ = server.shutdown().await;
        }
    }

    async fn client_of(api_version: u32, name: &str) -> (AgentClient, ttrpc::asynchronous::Server) {
        let path = std::env::temp_dir().join(format!(
            "brig-agent-test-{name}-{}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let addr = format!("unix://{}", path.display());
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&addr)
            .unwrap()
            .register_service(create_agent(Arc::new(OtherBuild(api_version))));
        server.start().await.unwrap();
        let client = ttrpc::asynchronous::Client::connect(&addr).await.unwrap();
        (AgentClient::from_ttrpc(client), server)
    }

    #[tokio::test]
    async fn an_agent_of_another_api_version_is_refused_with_the_fix() {
        let (agent, mut server) = client_of(AGENT_API_VERSION + 1, "mismatch").await;
        let err = agent.checked_version().await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, AgentError::Version { guest, host, .. } if guest == AGENT_API_VERSION + 1 && host == AGENT_API_VERSION),
            "{msg}"
        );
        assert!(
            msg.contains("make initramfs") && msg.contains("9.9.9"),
            "{msg}"
        );
        let _ = server.shutdown().await;

        let (agent, mut server) = client_of(AGENT_API_VERSION, "match").await;
        assert_eq!(
            agent.checked_version().await.unwrap().api_version,
            AGENT_API_VERSION
        );
        let _ = server.shutdown().await;
    }
}

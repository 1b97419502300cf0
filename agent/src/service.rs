//! The ttrpc `brig.agent.v1.Agent` service.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use brig_protocols::agent::{
    CloseStdinRequest, ConfigureNetworkRequest, CreateContainerRequest, CreateContainerResponse,
    Empty, ExecProcessRequest, ExecProcessResponse, ListProcessesRequest, ListProcessesResponse,
    MemoryEvents, PauseContainerRequest, RemoveContainerRequest, ResizeTtyRequest,
    ResumeContainerRequest, ShutdownRequest, SignalProcessRequest, StartContainerRequest,
    StatsRequest, StatsResponse, UpdateContainerRequest, VersionRequest, VersionResponse,
    VsockSelfTestRequest, VsockSelfTestResponse, WaitOomEventRequest, WaitOomEventResponse,
    WaitProcessRequest, WaitProcessResponse,
};
use brig_protocols::agent_ttrpc;
use ttrpc::{Code, TtrpcContext};

use crate::container::{ContainerError, Containers, ResourceUpdate};
use crate::guest_info;
use crate::vsock_self_test::{self, SelfTestError, Target};

/// Time given to the Shutdown reply to reach the host before the guest resets (the host
/// does not depend on it: a clean power-off is the answer too).
const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_millis(10);

/// The agent's state shared by all requests.
pub struct AgentService {
    /// Guest uptime when the server started listening; set once, right after it did.
    ready_uptime_ms: Arc<OnceLock<u64>>,
    /// Where VsockSelfTest connects.
    self_test_target: Target,
    /// Whether Shutdown may reboot the machine (PID 1) or only exits the process (debug run).
    is_pid1: bool,
    /// The sandbox's containers.
    containers: Containers,
}

impl AgentService {
    /// A service whose boot-to-ready time is filled in through `ready_uptime_ms`.
    pub fn new(
        ready_uptime_ms: Arc<OnceLock<u64>>,
        self_test_target: Target,
        is_pid1: bool,
        containers: Containers,
    ) -> Self {
        Self {
            ready_uptime_ms,
            self_test_target,
            is_pid1,
            containers,
        }
    }

    fn version(&self) -> Result<VersionResponse, guest_info::GuestInfoError> {
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: brig_protocols::AGENT_API_VERSION,
            kernel_release: guest_info::kernel_release()?,
            cpus_online: guest_info::cpus_online()?,
            mem_total_kib: guest_info::mem_total_kib()?,
            uptime_ms: guest_info::uptime_ms()?,
            boot_to_ready_ms: self.ready_uptime_ms.get().copied().unwrap_or(0),
            ..Default::default()
        })
    }
}

fn rpc_error(code: Code, message: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

/// A container error as the ttrpc status the host expects (see agent.proto).
fn container_error(call: &str, err: ContainerError) -> ttrpc::Error {
    let code = match &err {
        ContainerError::NotFound(_) => Code::NOT_FOUND,
        ContainerError::PermissionDenied(_) => Code::PERMISSION_DENIED,
        ContainerError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        ContainerError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        ContainerError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        ContainerError::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
        ContainerError::Unavailable(_) => Code::UNAVAILABLE,
        ContainerError::Internal(_) => Code::INTERNAL,
    };
    crate::info!("{call} failed: {err}");
    rpc_error(code, err)
}

impl agent_ttrpc::Agent for AgentService {
    fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        crate::debug!("CreateContainer {}", req.container_id);
        let ports = req.stdio.clone().unwrap_or_default();
        let pid = self
            .containers
            .create(&req.container_id, &req.oci_spec_json, &req.rootfs, &ports)
            .map_err(|err| container_error("CreateContainer", err))?;
        Ok(CreateContainerResponse {
            pid: u32::try_from(pid.as_raw()).unwrap_or(0),
            ..Default::default()
        })
    }

    fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::debug!("StartContainer {}", req.container_id);
        self.containers
            .start(&req.container_id)
            .map_err(|err| container_error("StartContainer", err))?;
        Ok(Empty::new())
    }

    fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        crate::debug!("ExecProcess {} {}", req.container_id, req.exec_id);
        let ports = req.stdio.clone().unwrap_or_default();
        let pid = self
            .containers
            .exec(&req.container_id, &req.exec_id, &req.process_json, &ports)
            .map_err(|err| container_error("ExecProcess", err))?;
        Ok(ExecProcessResponse {
            pid: u32::try_from(pid.as_raw()).unwrap_or(0),
            ..Default::default()
        })
    }

    fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        crate::debug!(
            "SignalProcess {} {:?} {}",
            req.container_id,
            req.exec_id,
            req.signal
        );
        self.containers
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .map_err(|err| container_error("SignalProcess", err))?;
        Ok(Empty::new())
    }

    fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        crate::debug!("WaitProcess {} {:?}", req.container_id, req.exec_id);
        let exit = self
            .containers
            .wait(&req.container_id, &req.exec_id)
            .map_err(|err| container_error("WaitProcess", err))?;
        Ok(WaitProcessResponse {
            exit_status: exit.status,
            signal: exit.signal,
            oom_killed: exit.oom_killed,
            ..Default::default()
        })
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.containers
            .close_stdin(&req.container_id, &req.exec_id)
            .map_err(|err| container_error("CloseStdin", err))?;
        Ok(Empty::new())
    }

    fn resize_tty(&self, _ctx: &TtrpcContext, req: ResizeTtyRequest) -> ttrpc::Result<Empty> {
        self.containers
            .resize_tty(&req.container_id, &req.exec_id, req.rows, req.cols)
            .map_err(|err| container_error("ResizeTty", err))?;
        Ok(Empty::new())
    }

    fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        let processes = self
            .containers
            .list_processes(&req.container_id)
            .map_err(|err| container_error("ListProcesses", err))?;
        Ok(ListProcessesResponse {
            processes,
            ..Default::default()
        })
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let stats = self
            .containers
            .stats(&req.container_id)
            .map_err(|err| container_error("Stats", err))?;
        Ok(StatsResponse {
            memory_current_bytes: stats.memory_current,
            memory_max_bytes: stats.memory_max,
            cpu_usage_usec: stats.cpu_usage_usec,
            pids_current: stats.pids_current,
            pids_max: stats.pids_max,
            oom_kills: stats.oom_kills,
            cpu_user_usec: stats.cpu.user_usec,
            cpu_system_usec: stats.cpu.system_usec,
            cpu_nr_periods: stats.cpu.nr_periods,
            cpu_nr_throttled: stats.cpu.nr_throttled,
            cpu_throttled_usec: stats.cpu.throttled_usec,
            memory_swap_current_bytes: stats.memory_swap_current,
            memory_swap_max_bytes: stats.memory_swap_max,
            memory_stat: stats.memory_stat,
            memory_events: Some(MemoryEvents {
                low: stats.memory_events.low,
                high: stats.memory_events.high,
                max: stats.memory_events.max,
                oom: stats.memory_events.oom,
                oom_kill: stats.memory_events.oom_kill,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }

    fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::debug!("PauseContainer {}", req.container_id);
        self.containers
            .pause(&req.container_id)
            .map_err(|err| container_error("PauseContainer", err))?;
        Ok(Empty::new())
    }

    fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::debug!("ResumeContainer {}", req.container_id);
        self.containers
            .resume(&req.container_id)
            .map_err(|err| container_error("ResumeContainer", err))?;
        Ok(Empty::new())
    }

    fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::debug!("UpdateContainer {}", req.container_id);
        let r = req.resources.clone().unwrap_or_default();
        let update = ResourceUpdate {
            memory_limit: r.memory_limit,
            memory_reservation: r.memory_reservation,
            memory_swap: r.memory_swap,
            cpu_shares: r.cpu_shares,
            cpu_quota: r.cpu_quota,
            cpu_period: r.cpu_period,
            cpuset_cpus: r.cpuset_cpus,
            cpuset_mems: r.cpuset_mems,
            pids_limit: r.pids_limit,
        };
        self.containers
            .update(&req.container_id, &update)
            .map_err(|err| container_error("UpdateContainer", err))?;
        Ok(Empty::new())
    }

    fn wait_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: WaitOomEventRequest,
    ) -> ttrpc::Result<WaitOomEventResponse> {
        let (container_id, oom_kills) = self.containers.wait_oom();
        crate::info!("OOM kill in container {container_id} (count {oom_kills})");
        Ok(WaitOomEventResponse {
            container_id,
            oom_kills,
            ..Default::default()
        })
    }

    fn configure_network(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureNetworkRequest,
    ) -> ttrpc::Result<Empty> {
        crate::debug!(
            "ConfigureNetwork: {} interfaces, {} routes",
            req.interfaces.len(),
            req.routes.len()
        );
        crate::network::configure(&req).map_err(|err| {
            let code = match &err {
                crate::network::NetworkError::Invalid(_) => Code::INVALID_ARGUMENT,
                crate::network::NetworkError::NoSuchMac(_) => Code::NOT_FOUND,
                _ => Code::INTERNAL,
            };
            rpc_error(code, format!("ConfigureNetwork: {err}"))
        })?;
        Ok(Empty::new())
    }

    fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::debug!("RemoveContainer {}", req.container_id);
        self.containers
            .remove(&req.container_id)
            .map_err(|err| container_error("RemoveContainer", err))?;
        Ok(Empty::new())
    }

    fn version(&self, _ctx: &TtrpcContext, _req: VersionRequest) -> ttrpc::Result<VersionResponse> {
        crate::debug!("Version");
        AgentService::version(self).map_err(|err| rpc_error(Code::INTERNAL, err))
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let is_pid1 = self.is_pid1;
        crate::info!("Shutdown requested");
        // Sync before answering: once the host has the answer, nothing written in the guest
        // can be lost, so it may stop the VMM without waiting for the reset.
        nix::unistd::sync();
        std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                std::thread::sleep(SHUTDOWN_REPLY_GRACE);
                if is_pid1 {
                    crate::info!("powering off");
                    crate::pid1::power_off();
                } else {
                    crate::agent_log!(
                        crate::logging::Level::Error,
                        "shutdown requested; not PID 1, so exiting instead of rebooting"
                    );
                    std::process::exit(0);
                }
            })
            .map_err(|err| rpc_error(Code::INTERNAL, format!("cannot start shutdown: {err}")))?;
        Ok(Empty::new())
    }

    fn vsock_self_test(
        &self,
        _ctx: &TtrpcContext,
        req: VsockSelfTestRequest,
    ) -> ttrpc::Result<VsockSelfTestResponse> {
        crate::debug!(
            "VsockSelfTest port {} send_bytes {}",
            req.port,
            req.send_bytes
        );
        match vsock_self_test::run(&self.self_test_target, req.port, req.send_bytes) {
            Ok(report) => {
                crate::debug!("VsockSelfTest received {} bytes", report.received_bytes);
                Ok(VsockSelfTestResponse {
                    received_bytes: report.received_bytes,
                    received_sha256: report.received_sha256.to_vec(),
                    sent_sha256: report.sent_sha256.to_vec(),
                    ..Default::default()
                })
            }
            Err(err) => {
                crate::warn!("VsockSelfTest failed: {err}");
                let code = match err {
                    SelfTestError::TooLarge { .. } | SelfTestError::BadPort(_) => {
                        Code::INVALID_ARGUMENT
                    }
                    SelfTestError::Connect { .. } => Code::UNAVAILABLE,
                    _ => Code::INTERNAL,
                };
                Err(rpc_error(code, err))
            }
        }
    }
}

/// Binds `address`, registers the service and starts serving on ttrpc's threads.
/// Returns the running server (dropping it does not stop it; keep it for clarity).
pub fn serve(
    address: &str,
    self_test_target: Target,
    is_pid1: bool,
    containers: Containers,
) -> anyhow::Result<(ttrpc::Server, u64)> {
    use anyhow::Context;
    if let Some(path) = address.strip_prefix("unix://") {
        // A stale socket from an earlier debug run would make bind fail.
        if !path.starts_with('@') && std::path::Path::new(path).exists() {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {path}"))?;
        }
    }
    let ready_uptime_ms = Arc::new(OnceLock::new());
    let service = AgentService::new(
        Arc::clone(&ready_uptime_ms),
        self_test_target,
        is_pid1,
        containers,
    );
    let mut server = ttrpc::Server::new()
        .bind(address)
        .with_context(|| format!("cannot listen on {address}"))?
        .register_service(agent_ttrpc::create_agent(Arc::new(service)));
    server
        .start()
        .with_context(|| format!("cannot start the ttrpc server on {address}"))?;
    let uptime = guest_info::uptime_ms().unwrap_or(0);
    let _ = ready_uptime_ms.set(uptime);
    Ok((server, uptime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use brig_protocols::agent_ttrpc::AgentClient;
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("brig-agent-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn serves_version_and_self_test_over_a_unix_socket() {
        let dir = temp_dir("service");
        let socket = format!("unix://{}", dir.join("agent.sock").display());
        let vsock_prefix = dir.join("vsock").display().to_string();
        let target = Target::UnixPrefix(vsock_prefix.clone());
        let containers = Containers::new(
            crate::container::RuntimeConfig {
                stdio_target: target.clone(),
                cgroup_root: None,
                share_problem: None,
            },
            Arc::new(crate::reaper::Reaper::default()),
        );
        let (server, ready) = serve(&socket, target, false, containers).unwrap();

        let client = AgentClient::new(ttrpc::Client::connect(&socket).unwrap());
        let ctx = || ttrpc::context::with_timeout(Duration::from_secs(20).as_nanos() as i64);

        // Version: what a host would check after boot.
        let version = client.version(ctx(), &VersionRequest::new()).unwrap();
        assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(version.api_version, brig_protocols::AGENT_API_VERSION);
        assert!(!version.kernel_release.is_empty());
        assert!(version.cpus_online >= 1);
        assert!(version.mem_total_kib > 0);
        assert!(version.uptime_ms >= version.boot_to_ready_ms);
        assert_eq!(version.boot_to_ready_ms, ready);

        // VsockSelfTest: the "host" listens where a hybrid vsock would put port 6000.
        let listener = UnixListener::bind(format!("{vsock_prefix}_6000")).unwrap();
        let host = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let sender = std::thread::spawn(move || {
                writer.write_all(&[7u8; 100_000]).unwrap();
                writer.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            stream.read_to_end(&mut got).unwrap();
            sender.join().unwrap();
            got
        });
        let mut req = VsockSelfTestRequest::new();
        req.port = 6000;
        req.send_bytes = 1_000_000;
        let reply = client.vsock_self_test(ctx(), &req).unwrap();
        let got = host.join().unwrap();
        assert_eq!(got.len(), 1_000_000);
        assert_eq!(reply.sent_sha256, Sha256::digest(&got).to_vec());
        assert_eq!(reply.received_bytes, 100_000);
        assert_eq!(
            reply.received_sha256,
            Sha256::digest([7u8; 100_000]).to_vec()
        );

        // Errors come back as readable ttrpc statuses.
        req.port = 6001;
        let err = client.vsock_self_test(ctx(), &req).unwrap_err();
        assert!(format!("{err:?}").contains("cannot connect to"), "{err:?}");
        req.send_bytes = 65 * 1024 * 1024;
        let err = client.vsock_self_test(ctx(), &req).unwrap_err();
        assert!(format!("{err:?}").contains("over the limit"), "{err:?}");

        server.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

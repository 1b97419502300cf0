//! Runs the real `brig-agent` binary the way a developer would outside a VM (not PID 1) and
//! talks to it with the generated sync client.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use brig_protocols::agent::VersionRequest;
use brig_protocols::agent_ttrpc::AgentClient;

/// Kills the agent when the test ends, pass or fail.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn version_flag_prints_the_crate_version() {
    let output = Command::new(env!("CARGO_BIN_EXE_brig-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.starts_with(&format!("brig-agent {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
}

#[test]
fn bad_arguments_are_refused() {
    let output = Command::new(env!("CARGO_BIN_EXE_brig-agent"))
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unexpected argument"));
}

#[test]
fn debug_run_serves_version_on_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("brig-agent-debug-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("agent.sock");
    let address = format!("unix://{}", socket.display());
    let _agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_brig-agent"))
            .args(["--listen", &address])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        if socket.exists() {
            if let Ok(client) = ttrpc::Client::connect(&address) {
                break AgentClient::new(client);
            }
        }
        assert!(
            Instant::now() < deadline,
            "agent never listened on {address}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let version = client
        .version(
            ttrpc::context::with_timeout(10_000_000_000),
            &VersionRequest::new(),
        )
        .unwrap();
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(version.api_version, brig_protocols::AGENT_API_VERSION);
    assert!(version.cpus_online >= 1 && version.mem_total_kib > 0);
    assert!(version.boot_to_ready_ms > 0 && version.uptime_ms >= version.boot_to_ready_ms);
    let _ = std::fs::remove_dir_all(&dir);
}

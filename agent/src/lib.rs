//! brig-agent: PID 1 of the Brig guest. Mounts the guest's filesystems, reaps orphans and
//! serves the `brig.agent.v1.Agent` ttrpc API on vsock port 1024.
//!
//! Run by hand (not PID 1) it skips everything that changes the machine and serves on the
//! address given by `--listen`, for debugging and tests.
//!
//! The binary is [`main`]; the library exists so that fuzz targets can reach what the agent
//! parses ([`check_oci_config`]).

mod container;
mod guest_info;
mod logging;
mod network;
mod options;
mod pid1;
mod reaper;
mod service;
mod vsock_self_test;

/// Held by the tests that wait for children of their own and by the one that reaps any
/// child (`waitpid(-1)`), which would otherwise take another test's child from under it.
#[cfg(test)]
pub(crate) static CHILDREN_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

use std::process::ExitCode;

use brig_protocols::AGENT_VSOCK_PORT;
use logging::Level;
use options::Command;
use vsock_self_test::Target;

/// The `brig-agent` binary: a container's init when re-executed as one, the guest's init as
/// PID 1, else the agent run by hand.
pub fn main() -> ExitCode {
    // A container's init is the agent re-executed, and PID 1 of its namespace: check first.
    if std::env::args().nth(1).as_deref() == Some(container::init::INIT_ARG) {
        container::init::main();
    }
    if nix::unistd::getpid().as_raw() == 1 {
        run_as_pid1()
    } else {
        run_by_hand()
    }
}

/// The guest's init. Never returns normally: it serves until Shutdown, and powers the guest
/// off on a fatal error rather than leaving a VM that hangs.
fn run_as_pid1() -> ! {
    logging::init(Level::Warn);
    // First of all: later mounts must land in the new root.
    let switching = std::time::Instant::now();
    let left_initramfs = pid1::leave_initramfs();
    let switch_time = switching.elapsed();
    // Before any thread exists, so every thread inherits the mask (see reaper.rs).
    if let Err(err) = reaper::block_sigchld() {
        error!("cannot block SIGCHLD: {err}");
    }
    if let Err(err) = pid1::mount_filesystems() {
        fatal(&format!("{err:#}"));
    }
    let kernel_options = match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) => options::parse_kernel_cmdline(&cmdline),
        Err(err) => {
            error!("cannot read /proc/cmdline: {err}; using defaults");
            options::KernelOptions::default()
        }
    };
    if let Some(level) = kernel_options.log_level {
        logging::set_level(level);
    }
    for problem in &kernel_options.problems {
        warn!("{problem}");
    }
    match left_initramfs {
        Ok(true) => info!(
            "left the initramfs for a tmpfs root in {} us",
            switch_time.as_micros()
        ),
        Ok(false) => {}
        Err(err) => error!(
            "cannot leave the initramfs for a tmpfs root: {err:#}; containers fall back to chroot"
        ),
    }
    debug!("starting as PID 1, version {}", env!("CARGO_PKG_VERSION"));
    if let Some(hostname) = &kernel_options.hostname {
        pid1::set_hostname(hostname);
    }
    pid1::populate_dev_and_tmp();
    pid1::enable_cgroup_controllers();
    if let Err(err) = network::loopback_up() {
        error!("cannot bring loopback up: {err}");
    }
    let share_problem = pid1::mount_share(kernel_options.share.as_deref());
    let reaper = match reaper::Reaper::start() {
        Ok(reaper) => reaper,
        Err(err) => fatal(&format!("{err:#}")),
    };
    let containers = container::Containers::new(
        container::RuntimeConfig {
            stdio_target: Target::HostVsock,
            cgroup_root: Some("/sys/fs/cgroup/brig".into()),
            share_problem,
        },
        reaper,
    );
    let address = format!("vsock://-1:{AGENT_VSOCK_PORT}");
    let _server = match service::serve(&address, Target::HostVsock, true, containers) {
        Ok((server, uptime)) => {
            agent_log!(
                Level::Error,
                "ready on vsock port {AGENT_VSOCK_PORT} (uptime {uptime} ms)"
            );
            server
        }
        Err(err) => fatal(&format!("{err:#}")),
    };
    park_forever()
}

/// Logs a fatal error and powers off (the VMM then exits).
fn fatal(message: &str) -> ! {
    agent_log!(Level::Error, "FATAL: {message}; powering off");
    pid1::power_off()
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// A debugging run on a developer machine or in tests: no mounts, no hostname, no reboot.
fn run_by_hand() -> ExitCode {
    let command = match options::parse_args(std::env::args().skip(1)) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("brig-agent: {err}");
            return ExitCode::from(2);
        }
    };
    let serve = match command {
        Command::Version => {
            println!(
                "brig-agent {} (agent API {})",
                env!("CARGO_PKG_VERSION"),
                brig_protocols::AGENT_API_VERSION
            );
            return ExitCode::SUCCESS;
        }
        Command::Help => {
            print!("{}", options::USAGE);
            return ExitCode::SUCCESS;
        }
        Command::Serve(serve) => serve,
    };
    logging::init(serve.log_level.unwrap_or(Level::Warn));
    if let Err(err) = reaper::block_sigchld() {
        error!("cannot block SIGCHLD: {err}");
    }
    agent_log!(
        Level::Error,
        "not PID 1: skipping mounts, cgroups and hostname; Shutdown exits instead of rebooting"
    );
    let reaper = match reaper::Reaper::start() {
        Ok(reaper) => reaper,
        Err(err) => {
            error!("{err:#}");
            return ExitCode::FAILURE;
        }
    };
    let address = serve
        .listen
        .unwrap_or_else(|| format!("vsock://-1:{AGENT_VSOCK_PORT}"));
    let target = match serve.self_test_uds {
        Some(prefix) => Target::UnixPrefix(prefix),
        None => Target::HostVsock,
    };
    let cgroup_root = match serve.cgroup_root {
        Some(root) => Some(std::path::PathBuf::from(root)),
        None if container::is_cgroup2(std::path::Path::new("/sys/fs/cgroup")) => {
            Some("/sys/fs/cgroup/brig".into())
        }
        None => {
            warn!("/sys/fs/cgroup is not cgroup v2: containers run without cgroups (no limits, Stats, OOM reports)");
            None
        }
    };
    let containers = container::Containers::new(
        container::RuntimeConfig {
            stdio_target: target.clone(),
            cgroup_root,
            share_problem: None,
        },
        reaper,
    );
    let _server = match service::serve(&address, target, false, containers) {
        Ok((server, uptime)) => {
            agent_log!(Level::Error, "ready on {address} (uptime {uptime} ms)");
            server
        }
        Err(err) => {
            error!("{err:#}");
            return ExitCode::FAILURE;
        }
    };
    park_forever()
}

/// Reads a container's OCI config (`config.json`) and an exec's `process` as the agent does
/// for CreateContainer and ExecProcess, before anything in the guest changes: every check
/// and translation that can refuse it (process, user namespace, seccomp profile, device
/// rules). For fuzz targets: any bytes give `Ok` or an error, never a panic.
pub fn check_oci_config(spec_json: &str, process_json: &str) -> Result<(), String> {
    let spec = container::parse_spec(spec_json).map(drop);
    let process = container::parse_process(process_json).map(drop);
    spec.and(process).map_err(|err| err.to_string())
}

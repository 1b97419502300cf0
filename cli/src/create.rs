//! The OCI runtime CLI's `create` and `start`, as runc's: `create` sets a container up in a
//! microVM of its own and leaves its command waiting; `start` runs the command.
//!
//! Something must hold the microVM between the two and stand for the container on the host,
//! as runc leaves its init process behind: `create` starts a background `brig`, the
//! container's keeper. The keeper keeps the stdio `create` was given and relays the
//! container's to it, writes its own PID to `--pid-file` (the process conmon and other
//! engines wait for), forwards the signals it gets to the container, and exits with the
//! container's exit status (128 + N after signal N). `create` returns once the keeper says
//! the container is created; `start` wakes the keeper through a FIFO in the container's
//! state directory.
//!
//! Pods (see `brig_runtime::pod`): a container whose annotations make it a member of a pod
//! (CRI-O's `io.kubernetes.cri-o.ContainerType=container` with `…SandboxID`, or containerd
//! CRI's `io.kubernetes.cri.container-type`/`sandbox-id`) is created in the microVM of that
//! sandbox container instead of booting one, and joins its IPC, UTS and PID namespaces where
//! the spec names them as `/proc/PID/ns/…` of the sandbox's PID, or by the paths the
//! sandbox's own spec named (CRI-O's pinned namespaces). Its keeper stands for it as for any
//! container and takes it out of the microVM when its command exits. A pod's sandbox
//! container (type `sandbox`) boots the microVM, which outlives its command, so that the
//! containers that joined it run on; `delete` of the sandbox container removes it.

use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use brig_runtime::container::{Container, ContainerConfig, Volume};
use brig_runtime::pod::{PodRole, PodSandbox};
use brig_runtime::spec;
use brig_runtime::state::{Layout, StateError, Status};
use brig_runtime::{RuntimeConfig, SandboxSpec};
use oci_spec::runtime::LinuxNamespaceType;

use crate::run::{Output, Place, Run};
use crate::EXIT_BRIG_ERROR;

/// Arguments of `brig create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The bundle: a directory with config.json and the root filesystem it names.
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// Write the PID of the process that stands for the container here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// A Unix socket to send the container's terminal to (with process.terminal): the
    /// master of a host PTY, sent with SCM_RIGHTS, as runc does.
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted as runc does; the container's root is always pivoted in its microVM.
    #[arg(long)]
    no_pivot: bool,
    /// Accepted as runc does; session keyrings are the guest kernel's.
    #[arg(long)]
    no_new_keyring: bool,
    /// Container ID.
    id: String,
}

/// Arguments of `brig start`.
#[derive(clap::Args, Debug)]
pub struct StartArgs {
    /// Container ID.
    id: String,
}

/// Set in the keeper's environment: the descriptor on which it tells `create` that the
/// container exists.
const KEEPER_READY_FD: &str = "BRIG_KEEPER_READY_FD";

/// The FIFO in a created container's directory that `start` writes to.
const START_FIFO: &str = "start.fifo";

/// How long `start` waits for the keeper to have started the command.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: CreateArgs, root: Option<PathBuf>) -> anyhow::Result<u8> {
    // The caller's mistakes are told by `create` itself, before any keeper exists.
    let bundle = std::path::absolute(&args.bundle)
        .with_context(|| format!("bundle {}", args.bundle.display()))?;
    anyhow::ensure!(
        bundle.join("config.json").is_file(),
        "bundle {} has no config.json",
        bundle.display()
    );
    brig_runtime::state::validate_id("container", &args.id)?;
    let target = spec::load_target(&bundle)?;
    let tty = target.spec.process().as_ref().and_then(|p| p.terminal()) == Some(true);
    crate::console::check(tty, args.console_socket.as_deref(), true)?;
    crate::hooks::check(&target.spec)?;
    let mut config = RuntimeConfig::load()?;
    if let Some(root) = root {
        config.root = root;
    }
    // A member of a pod needs its sandbox up: a wrong or stopped one is the caller's
    // mistake, told before any keeper exists.
    let role = PodRole::of(target.spec.annotations().as_ref());
    let pod = PodSandbox::find(&Layout::new(&config.root), &args.id, &role)?;
    match keeper_ready()? {
        Some(ready) => keep(
            args,
            config,
            Pod { role, sandbox: pod },
            bundle,
            target,
            tty,
            ready,
        ),
        None => spawn_keeper(&format!("created {}", args.id)),
    }
}

/// What a container is in its pod, and the sandbox container it joins.
struct Pod {
    role: PodRole,
    sandbox: Option<PodSandbox>,
}

/// In a keeper: the descriptor on which it tells its caller it is ready. `None` in the
/// caller itself.
pub(crate) fn keeper_ready() -> anyhow::Result<Option<std::fs::File>> {
    let Ok(value) = std::env::var(KEEPER_READY_FD) else {
        return Ok(None);
    };
    let fd: i32 = value
        .parse()
        .with_context(|| format!("{KEEPER_READY_FD}={value:?} is not a descriptor"))?;
    // SAFETY: the caller passed this descriptor, open, for us alone; nothing else owns it.
    let ready = unsafe { OwnedFd::from_raw_fd(fd) };
    // Nothing started from here (the VMM) may keep it.
    nix::fcntl::fcntl(
        &ready,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("marking the ready pipe close-on-exec")?;
    Ok(Some(std::fs::File::from(ready)))
}

/// Start this same command again as a keeper, in a session of its own with this process's
/// stdio, and return once it writes the line `expect` on its ready pipe (or with its status
/// if it could not: it said why on the stderr we share).
pub(crate) fn spawn_keeper(expect: &str) -> anyhow::Result<u8> {
    use std::os::unix::process::CommandExt;
    let (ready_read, ready_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("making a pipe")?;
    let exe = std::env::current_exe().context("finding brig's own binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(KEEPER_READY_FD, "3");
    let write_fd = ready_write.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) on plain integers.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // fd 3 without close-on-exec (dup2 onto itself would keep the flag).
            let done = if write_fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(write_fd, 3)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut keeper = cmd.spawn().context("starting the container's keeper")?;
    drop(ready_write);
    let mut line = String::new();
    let _ = std::io::BufReader::new(std::fs::File::from(ready_read)).read_line(&mut line);
    if line.trim_end() == expect {
        return Ok(0);
    }
    // The keeper said why on the stderr we share.
    let status = keeper
        .wait()
        .context("waiting for the container's keeper")?;
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .filter(|c| *c != 0)
        .unwrap_or(EXIT_BRIG_ERROR))
}

/// The keeper: the container's whole life, paused between created and started.
fn keep(
    args: CreateArgs,
    config: RuntimeConfig,
    pod: Pod,
    bundle: PathBuf,
    target: spec::Target,
    tty: bool,
    ready: std::fs::File,
) -> anyhow::Result<u8> {
    let id = args.id.clone();
    // The keeper's stdin and stdout become the terminal the engine holds the other end of.
    if let Some(socket) = &args.console_socket {
        crate::console::take_terminal(socket)?;
    }
    let layout = Layout::new(&config.root);
    anyhow::ensure!(
        !layout.container(&id).exists(),
        "container {id} already exists: delete it first (brig delete {id})"
    );
    // A pod of one, owned by this keeper; a pod's sandbox outlives it (see the module's
    // documentation); a member boots nothing.
    let mut sandbox_spec = SandboxSpec::pod_of_one(id.clone(), &config, &target.spec);
    sandbox_spec.tie_to_owner = pod.role != PodRole::Sandbox;
    sandbox_spec.outlives_owner = pod.role == PodRole::Sandbox;
    // A network namespace the spec names (an engine's, made with CNI) is joined; a new one,
    // as runc makes it, has loopback only.
    sandbox_spec.netns = target
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|namespaces| {
            namespaces
                .iter()
                .find(|ns| ns.typ() == LinuxNamespaceType::Network)
                .and_then(|ns| ns.path().clone())
        });
    let memory = target
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .and_then(|l| u64::try_from(l).ok());
    let mut spec = target.spec;
    // The host's hooks run here (see `hooks`); the guest gets only the startContainer
    // hooks (brig_runtime::spec::guest_hooks).
    let hooks = spec.hooks().clone();
    // An engine's bind mounts of host files (podman's /etc/hosts, /etc/resolv.conf, `-v`)
    // reach the guest through the share.
    let volumes = Volume::take_host_binds(&mut spec);
    // Other namespace paths name host processes, which mean nothing in the guest (where
    // the same path could even name an unrelated process): the container gets new ones,
    // but for those of its pod's sandbox container that a member joins.
    match &pod.sandbox {
        Some(sandbox) => sandbox.guest_namespaces(&mut spec),
        None => brig_runtime::pod::guest_namespaces(&mut spec, None),
    }
    let container = ContainerConfig {
        id: id.clone(),
        spec,
        rootfs: target.rootfs,
        volumes,
        stdin: true,
        bundle: Some(bundle.clone()),
    };
    let run = Run {
        layout: &layout,
        config: &config,
        place: match pod.sandbox {
            Some(sandbox) => Place::Join(Box::new(sandbox)),
            None if pod.role == PodRole::Sandbox => Place::PodSandbox(&sandbox_spec),
            None => Place::Own(&sandbox_spec),
        },
        container: &container,
        resolv_conf: None,
        hostname: None,
        output: Output::User { tty, logs: None },
        memory,
        remove: false,
        bundle: Some(bundle),
        hooks: Some(crate::hooks::HostHooks {
            hooks,
            netns: sandbox_spec.netns.clone(),
        }),
        gate: Some(StartGate {
            pid_file: args.pid_file.map(std::path::absolute).transpose()?,
            ready: std::sync::Mutex::new(Some(ready)),
        }),
        image: None,
    };
    run.execute_here()
}

/// Between created and started: what the keeper tells `create`, and what it waits for.
pub(crate) struct StartGate {
    /// Where the keeper's PID goes.
    pid_file: Option<PathBuf>,
    /// `create`'s end: one line, then closed.
    ready: std::sync::Mutex<Option<std::fs::File>>,
}

impl StartGate {
    /// The container exists: make the start FIFO, write the PID file, tell `create`, and
    /// wait until `start` writes to the FIFO.
    pub(crate) async fn report_and_wait(&self, dir: &Path, id: &str) -> anyhow::Result<()> {
        let fifo = dir.join(START_FIFO);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .with_context(|| format!("making {}", fifo.display()))?;
        if let Some(path) = &self.pid_file {
            write_pid_file(path)?;
        }
        let ready = self
            .ready
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut ready) = ready {
            writeln!(ready, "created {id}").context("telling brig create")?;
        }
        let opened = fifo.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut byte = [0u8; 1];
            let mut file = std::fs::File::open(&opened)?;
            std::io::Read::read_exact(&mut file, &mut byte)
        })
        .await
        .context("waiting for brig start")?
        .with_context(|| format!("waiting on {}", fifo.display()))?;
        let _ = std::fs::remove_file(&fifo);
        Ok(())
    }
}

/// Write our PID to `path` atomically, as runc does (a reader never sees half a number).
pub(crate) fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("--pid-file {} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.brig-tmp", name.to_string_lossy()));
    std::fs::write(&tmp, std::process::id().to_string())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// `brig start`: wake the keeper of a created container and wait until its command runs.
pub fn start(args: StartArgs, layout: &Layout) -> anyhow::Result<u8> {
    use std::os::unix::fs::OpenOptionsExt;
    let container = Container::load(layout, &args.id)?;
    let status = container.state().status;
    anyhow::ensure!(
        status == Status::Created,
        "container {} is {}: only a created container can be started",
        args.id,
        status.as_str()
    );
    let fifo = container.dir().join(START_FIFO);
    // Non-blocking: with nobody reading (a keeper that is gone) this fails at once.
    let mut gate = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .with_context(|| format!("container {} has no keeper waiting to start it", args.id))?;
    gate.write_all(b"s")
        .with_context(|| format!("starting container {}", args.id))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match layout.load(&args.id) {
            Ok(state) if state.status == Status::Created => {}
            Ok(_) => return Ok(0),
            Err(StateError::NotFound { .. }) => {
                bail!(
                    "container {} failed to start (its keeper said why)",
                    args.id
                )
            }
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "container {} did not start within {} s",
            args.id,
            START_TIMEOUT.as_secs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

//! The shim's three entry points: `start`, `delete` and serving the task API.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use brig_runtime::container::Container;
use brig_runtime::state::Layout;
use containerd_shim::Flags;
use containerd_shim_protos::protobuf::Message;

use crate::task::{self, Service};

/// The environment variable that tells a serving shim which descriptor is its listening
/// socket, bound by `start` (so the address works the moment `start` prints it).
const LISTEN_FD_ENV: &str = "BRIG_SHIM_LISTEN_FD";
/// The descriptor number the listener gets in the serving shim.
const LISTEN_FD: i32 = 3;

/// The bundle: `-bundle`, else the working directory (where containerd runs the shim).
fn bundle_dir(flags: &Flags) -> anyhow::Result<PathBuf> {
    if !flags.bundle.is_empty() {
        return Ok(PathBuf::from(&flags.bundle));
    }
    std::env::current_dir().context("the shim's working directory (the bundle)")
}

fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// `start`: print the address of the shim serving this container's pod, spawning it first
/// when the pod has none yet.
pub fn start(flags: &Flags) -> anyhow::Result<()> {
    if flags.id.is_empty() || flags.namespace.is_empty() || flags.address.is_empty() {
        bail!("start needs -id, -namespace and -address (containerd passes them)");
    }
    let bundle = bundle_dir(flags)?;
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .with_context(|| format!("reading {}", bundle.join("config.json").display()))?;
    // Which pod (and so which shim and microVM) it belongs to: its sandbox's for a member
    // of a Kubernetes pod, else its own (a pod sandbox, or a container alone as `ctr run`
    // makes it).
    let group = brig_runtime::pod::PodRole::of(spec.annotations().as_ref())
        .group(&flags.id)
        .to_string();
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &group);
    let path = socket_path(&address);
    let listener = match bind(path)? {
        Some(listener) => listener,
        None => {
            // The pod's shim runs: its container joins that shim (and that microVM).
            return answer(&bundle, &address);
        }
    };
    spawn_server(flags, &group, &address, &listener)?;
    answer(&bundle, &address)
}

/// Bind the pod's socket; `None` when a live shim serves it already.
fn bind(path: &Path) -> anyhow::Result<Option<UnixListener>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    for _ in 0..2 {
        match UnixListener::bind(path) {
            Ok(listener) => return Ok(Some(listener)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Ok(None);
                }
                // A shim that died left its socket: nobody answers there.
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("binding {}", path.display())),
        }
    }
    bail!(
        "{} is taken by a socket that keeps coming back",
        path.display()
    )
}

fn spawn_server(
    flags: &Flags,
    group: &str,
    address: &str,
    listener: &UnixListener,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the shim's own binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["-namespace", &flags.namespace, "-id", group])
        .args([
            "-address",
            &flags.address,
            "-publish-binary",
            &flags.publish_binary,
        ])
        .args(["-socket", address])
        .env(LISTEN_FD_ENV, LISTEN_FD.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if flags.debug {
        cmd.arg("-debug");
    }
    let fd = listener.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, dup2, fcntl) on
    // descriptors this process owns.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: signals to containerd's process group do not reach the pod.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if fd == LISTEN_FD {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, LISTEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("spawning the shim server")?;
    tracing::debug!(pid = child.id(), %group, "shim server spawned");
    Ok(())
}

/// Record the address in the bundle (containerd reads it again after a restart) and print it.
fn answer(bundle: &Path, address: &str) -> anyhow::Result<()> {
    std::fs::write(bundle.join("address"), address)
        .with_context(|| format!("writing {}", bundle.join("address").display()))?;
    use std::io::Write;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// The state root of the shim's containers in containerd namespace `namespace`: IDs are
/// unique only within a namespace.
pub fn namespace_root(base: &Path, namespace: &str) -> anyhow::Result<PathBuf> {
    brig_runtime::state::validate_id("containerd namespace", namespace)?;
    Ok(base.join("containerd").join(namespace))
}

/// The file in a container's bundle that names the Brig state root its shim used: `delete`
/// runs without the runtime options (containerd passes them to `start` and Create only), so
/// it could not tell which brig.toml, and so which root, a pod used.
const ROOT_FILE: &str = "brig-root";

/// Note in `bundle` the state root (of the namespace) its container's records live under.
pub fn record_root(bundle: &Path, root: &Path) -> std::io::Result<()> {
    std::fs::write(bundle.join(ROOT_FILE), root.as_os_str().as_encoded_bytes())
}

/// The state root noted in `bundle` (see [`record_root`]), else the default configuration's.
fn recorded_root(bundle: &Path, namespace: &str) -> anyhow::Result<PathBuf> {
    match std::fs::read(bundle.join(ROOT_FILE)) {
        Ok(bytes) => {
            let root = PathBuf::from(std::ffi::OsString::from_vec(bytes));
            if !root.is_absolute() {
                bail!(
                    "{} in {} is not an absolute path",
                    ROOT_FILE,
                    bundle.display()
                );
            }
            Ok(root)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            namespace_root(&brig_runtime::RuntimeConfig::state_root(None)?, namespace)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}/{ROOT_FILE}", bundle.display())),
    }
}

/// `delete`: clean up what a container left when its shim is gone (containerd calls this
/// after a shim died or a start failed): its microVM if it owned the pod's, its rootfs
/// mount, its record. Prints containerd's DeleteResponse.
pub fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = bundle_dir(flags)?;
    init_logging(flags, None);
    let root = recorded_root(&bundle, &flags.namespace)?;
    brig_runtime::state::validate_id("container", &flags.id)?;
    let layout = Layout::new(&root);
    if let Ok(container) = Container::load(&layout, &flags.id) {
        if let Err(e) = container.forget() {
            tracing::warn!("forgetting container {}: {e}", flags.id);
        }
    }
    if layout.sandbox(&flags.id).exists() {
        brig_runtime::sandbox::remove_sandbox(&root, &flags.id)
            .with_context(|| format!("removing the microVM of {}", flags.id))?;
        // The pod's host cgroup the dead shim and its VMM were in.
        let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).ok();
        let path = spec
            .as_ref()
            .and_then(|s| s.linux().as_ref())
            .and_then(|l| l.cgroups_path().clone());
        if let Some(path) = path.as_deref().and_then(Path::to_str) {
            brig_runtime::cgroup::remove_path(path);
        }
    }
    task::unmount_rootfs(&bundle.join("rootfs"));
    let mut response = containerd_shim_protos::api::DeleteResponse::new();
    response.exit_status = 128 + libc::SIGKILL as u32;
    response.exited_at = Some(task::now()).into();
    let bytes = response.write_to_bytes()?;
    use std::io::Write;
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}

/// Logs go to the `log` FIFO containerd reads in the bundle (quiet by default: warnings;
/// `-debug` or `BRIG_LOG` for more), never blocking the shim when nobody reads it.
fn init_logging(flags: &Flags, fifo: Option<&Path>) {
    let filter = std::env::var("BRIG_LOG")
        .unwrap_or_else(|_| if flags.debug { "debug" } else { "warn" }.to_string());
    let filter = tracing_subscriber::EnvFilter::new(filter);
    let writer = fifo.and_then(|p| {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags_nonblock()
            .open(p)
            .ok()
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match writer {
        Some(file) => {
            let _ = builder.with_writer(std::sync::Mutex::new(file)).try_init();
        }
        None => {
            let _ = builder.with_writer(std::io::stderr).try_init();
        }
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// Serve the task API on the listener `start` bound (or bind `-socket` when run by hand).
pub fn serve(flags: &Flags) -> anyhow::Result<()> {
    if flags.socket.is_empty() {
        bail!("serving needs -socket (run the shim through containerd: `start` spawns the server)");
    }
    let bundle = bundle_dir(flags)?;
    init_logging(flags, Some(&bundle.join("log")));
    let listener = match std::env::var(LISTEN_FD_ENV) {
        Ok(fd) => {
            let fd: i32 = fd.parse().context("BRIG_SHIM_LISTEN_FD")?;
            // SAFETY: `start` passed this descriptor, a listening socket, to this process
            // alone; nothing else here owns it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            UnixListener::from(owned)
        }
        Err(_) => bind(socket_path(&flags.socket))?
            .with_context(|| format!("a shim already serves {}", flags.socket))?,
    };
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the shim's async runtime")?;
    let socket = socket_path(&flags.socket).to_path_buf();
    let result = runtime.block_on(async {
        let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        let service = Service::new(flags, &ttrpc_address).await?;
        let exit = service.exit_signal();
        let tasks = containerd_shim_protos::shim_async::create_task(Arc::new(service));
        let listener =
            containerd_shim_protos::ttrpc::r#async::transport::Listener::try_from(listener)
                .context("serving the task API")?;
        let mut server = containerd_shim_protos::ttrpc::r#async::Server::new()
            .add_listener(listener)
            .register_service(tasks);
        server.start().await.context("serving the task API")?;
        tracing::debug!("serving {}", flags.socket);
        exit.wait().await;
        let _ = server.shutdown().await;
        anyhow::Ok(())
    });
    let _ = std::fs::remove_file(&socket);
    // The pod's sandbox, if any is left, ended with the service (its Drop kills the VMM).
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_finds_the_state_root_its_pod_used() {
        let bundle = std::env::temp_dir().join(format!("brig-shim-root-{}", std::process::id()));
        std::fs::create_dir_all(&bundle).unwrap();
        let root = Path::new("/var/tmp/some root/containerd/k8s.io");
        record_root(&bundle, root).unwrap();
        assert_eq!(recorded_root(&bundle, "k8s.io").unwrap(), root);
        std::fs::write(bundle.join(ROOT_FILE), "relative/root").unwrap();
        assert!(recorded_root(&bundle, "k8s.io").is_err());
        std::fs::remove_file(bundle.join(ROOT_FILE)).unwrap();
        assert!(recorded_root(&bundle, "k8s.io")
            .unwrap()
            .ends_with("containerd/k8s.io"));
        let _ = std::fs::remove_dir_all(&bundle);
    }
}

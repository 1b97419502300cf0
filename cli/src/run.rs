//! `brig run`: one container in its own microVM.

use std::path::PathBuf;

use anyhow::Context;
use brig_runtime::container::{Container, ContainerConfig, Volume};
use brig_runtime::pod::PodSandbox;
use brig_runtime::spec::{self, Overrides};
use brig_runtime::state::{Layout, ProcessRef};
use brig_runtime::{RuntimeConfig, Sandbox, SandboxSpec};

use crate::images::{PullPolicy, RunImage, TlsArgs};
use crate::relay;
use crate::EXIT_BRIG_ERROR;

/// Arguments of `brig run`.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Remove the container when it exits (otherwise `brig ps -a`, `brig logs` and `brig rm` see it).
    #[arg(long)]
    rm: bool,
    /// Run in the background: print the container ID and return; output goes to `brig logs`.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Keep stdin open and send it to the container.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Give the container a terminal.
    #[arg(short = 't', long)]
    tty: bool,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// Container name (default: a random ID).
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory inside the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User to run as: UID or UID:GID.
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]")]
    user: Option<String>,
    /// CPU limit (fractions allowed); the microVM gets enough vCPUs for it.
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory limit: 64M, 1G… (the microVM gets this plus room for its kernel).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// Maximum number of processes in the container.
    #[arg(long, value_name = "N")]
    pids_limit: Option<i64>,
    /// Bind a host path into the container: HOST:CONTAINER[:ro].
    #[arg(short = 'v', long = "volume", value_name = "HOST:CTR[:ro]")]
    volumes: Vec<String>,
    /// Network: `bridge` (a namespace on the host bridge brig0, made by the CNI bridge,
    /// host-local and portmap plugins, with NAT to the outside; the default, as docker's),
    /// `none` (loopback only), or `netns:PATH` (join a namespace someone else made, e.g.
    /// with CNI). Default from brig.toml's `network`.
    #[arg(long, value_name = "bridge|none|netns:PATH")]
    network: Option<String>,
    /// Publish a container port on the host (bridge network): HOST:CTR[/tcp|udp].
    #[arg(short = 'p', long = "publish", value_name = "HOST:CTR[/PROTO]")]
    publish: Vec<brig_runtime::cni::PortMapping>,
    /// Publish every port the image exposes, each on a free host port (`brig port NAME`
    /// shows which).
    #[arg(short = 'P', long = "publish-all")]
    publish_all: bool,
    /// DNS server for the container's /etc/resolv.conf (default on a bridge: the host's
    /// servers, loopback ones left out).
    #[arg(long, value_name = "IP")]
    dns: Vec<std::net::IpAddr>,
    /// Security options: seccomp=PROFILE.json (an OCI linux.seccomp object).
    #[arg(long = "security-opt", value_name = "OPT")]
    security_opt: Vec<String>,
    /// When to pull the image: missing (only when it is not in the store), always, never.
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = PullPolicy::Missing)]
    pull: PullPolicy,
    #[command(flatten)]
    tls: TlsArgs,
    /// Replace the image's entrypoint (and drop its default command).
    #[arg(long, value_name = "CMD")]
    entrypoint: Option<String>,
    /// An image (NAME[:TAG], NAME@sha256:…, docker://…, oci:DIR[:TAG], oci-archive:FILE[:TAG]),
    /// or a directory: a root filesystem, or an OCI bundle (one with config.json). An
    /// existing directory wins over an image of the same name.
    #[arg(value_name = "IMAGE|ROOTFS|BUNDLE")]
    target: String,
    /// Command and arguments (default: the image's or the bundle's, or sh).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// Parse a size: bytes, or with a k/m/g suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 64M or 1G)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?} is not a size (try 64M or 1G)")),
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes < 6 << 20 {
        return Err(format!(
            "{s:?} is too small: the minimum memory limit is 6M"
        ));
    }
    Ok(bytes)
}

fn random_id() -> String {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32);
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    format!("{x:016x}")[..12].to_string()
}

/// What `brig run` ends with: the container's exit status, or Brig's own error status.
pub fn run(args: RunArgs, root: Option<PathBuf>) -> anyhow::Result<u8> {
    let detached = std::env::var(DETACHED_ENV).ok();
    // The user's own input first: a wrong path or image matters more than a missing kernel.
    let path = std::path::Path::new(&args.target);
    let image = if path.is_dir() || args.target.starts_with(['/', '.']) {
        None
    } else {
        // The foreground `brig run -d` pulled it already.
        let policy = if detached.is_some() {
            PullPolicy::Never
        } else {
            args.pull
        };
        Some(RunImage::resolve(&args.target, policy, &args.tls)?)
    };
    let mut config = RuntimeConfig::load()?;
    if let Some(root) = root {
        config.root = root;
    }
    // The background `brig` of `run -d` gets the ID the foreground one printed.
    let id = args
        .name
        .clone()
        .or_else(|| detached.clone())
        .unwrap_or_else(random_id);
    let layout = Layout::new(&config.root);
    brig_runtime::state::validate_id("container", &id)?;
    anyhow::ensure!(
        !layout.container(&id).exists(),
        "a container named {id} already exists: remove it with `brig rm {id}` or pick another --name"
    );
    if let Some(image) = image {
        if args.detach && detached.is_none() {
            return detach(&id);
        }
        // The writable layer stays with the container until `brig rm` (or --rm): after a
        // failure before the container has a record, nothing names it, so it goes now.
        let scratch = image.scratch(&id);
        let result = run_image(&args, &config, &layout, &id, image, &scratch);
        if !layout.container(&id).join("state.json").exists() {
            let _ = brig_runtime::rootfs::remove_overlay(&scratch);
        }
        return result;
    }
    let target = spec::load_target(path)?;
    run_target(&args, &config, &layout, &id, target, None)
}

/// `brig run IMAGE`: the image's layers under an overlay, its config as the defaults.
fn run_image(
    args: &RunArgs,
    config: &RuntimeConfig,
    layout: &Layout,
    id: &str,
    image: RunImage,
    scratch: &std::path::Path,
) -> anyhow::Result<u8> {
    let lowers = image.store.lower_dirs(&image.record)?;
    // No container has this ID (checked above): a scratch directory left by one that a
    // host reboot took away is stale.
    brig_runtime::rootfs::remove_overlay(scratch)?;
    let rootfs = brig_runtime::rootfs::mount_overlay(&lowers, scratch)?;
    let mut target = spec::load_target(&rootfs)?;
    let defaults = &image.record.defaults;
    let mut process = target.spec.process().clone().unwrap_or_default();
    process.set_env(Some(spec::merge_env(
        process.env().clone().unwrap_or_default(),
        &defaults.env,
    )?));
    if let Some(dir) = defaults
        .working_dir
        .as_deref()
        .filter(|d| d.starts_with('/'))
    {
        process.set_cwd(dir.into());
    }
    // docker's rules: arguments replace CMD and keep ENTRYPOINT; --entrypoint replaces
    // ENTRYPOINT and drops CMD.
    let entrypoint = match &args.entrypoint {
        Some(e) => vec![e.clone()],
        None => defaults.entrypoint.clone(),
    };
    let cmd = if !args.command.is_empty() {
        args.command.clone()
    } else if args.entrypoint.is_some() {
        Vec::new()
    } else {
        defaults.cmd.clone()
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    anyhow::ensure!(
        !argv.is_empty(),
        "image {} has no entrypoint or command: give one after the image name",
        image.record.name
    );
    process.set_args(Some(argv));
    target.spec.set_process(Some(process));
    let user = match args.user.as_deref().or(defaults.user.as_deref()) {
        Some(user) => {
            let (uid, gid) = brig_runtime::rootfs::lookup_user(&rootfs, user)?;
            Some(format!("{uid}:{gid}"))
        }
        None => None,
    };
    run_target(
        args,
        config,
        layout,
        id,
        target,
        Some(ImageRun {
            published: published_exposed_ports(args, defaults)?,
            image: ContainerImage {
                name: image.record.name.clone(),
                scratch: scratch.to_path_buf(),
                hold: std::sync::Mutex::new(Some(image.hold)),
            },
            user,
        }),
    )
}

/// With `-P`, the ports the image exposes that `-p` does not publish already, each on a free
/// host port.
fn published_exposed_ports(
    args: &RunArgs,
    defaults: &brig_image::ImageDefaults,
) -> anyhow::Result<Vec<brig_runtime::cni::PortMapping>> {
    if !args.publish_all {
        return Ok(Vec::new());
    }
    let mut ports = Vec::new();
    for exposed in &defaults.exposed_ports {
        let port = brig_runtime::cni::PortMapping::exposed(exposed).map_err(anyhow::Error::msg)?;
        let taken = args
            .publish
            .iter()
            .any(|p| p.container_port == port.container_port && p.protocol == port.protocol);
        if !taken {
            ports.push(port);
        }
    }
    Ok(ports)
}

/// What `brig run IMAGE` adds to a run.
struct ImageRun {
    /// Ports the image exposes, published by `-P`.
    published: Vec<brig_runtime::cni::PortMapping>,
    image: ContainerImage,
    /// The user, resolved through the image's /etc/passwd.
    user: Option<String>,
}

/// The image a container is made from, for its record.
pub(crate) struct ContainerImage {
    /// As the image store names it.
    pub(crate) name: String,
    /// The scratch directory of the container's overlay root filesystem.
    pub(crate) scratch: PathBuf,
    /// The image store's hold (see `brig_image::Store::hold`), let go once the record
    /// names the image: from then on `rmi` sees the container.
    pub(crate) hold: std::sync::Mutex<Option<nix::fcntl::Flock<std::fs::File>>>,
}

fn run_target(
    args: &RunArgs,
    config: &RuntimeConfig,
    layout: &Layout,
    id: &str,
    mut target: spec::Target,
    image: Option<ImageRun>,
) -> anyhow::Result<u8> {
    let id = id.to_string();
    let mut seccomp = None;
    for opt in &args.security_opt {
        match opt.split_once('=') {
            Some(("seccomp", path)) => {
                seccomp = Some(spec::load_seccomp(std::path::Path::new(path))?)
            }
            _ => anyhow::bail!("--security-opt {opt:?}: only seccomp=PROFILE.json is supported"),
        }
    }
    let volumes = args
        .volumes
        .iter()
        .map(|v| v.parse::<Volume>())
        .collect::<Result<Vec<_>, _>>()?;
    let overrides = Overrides {
        args: if image.is_some() {
            Vec::new() // set from the image already
        } else if args.command.is_empty() && !target.bundle {
            vec!["sh".into()]
        } else {
            args.command.clone()
        },
        env: args.env.clone(),
        cwd: args.workdir.clone(),
        user: match &image {
            Some(image) => image.user.clone(),
            None => args.user.clone(),
        },
        terminal: args.tty,
        hostname: (!target.bundle).then(|| id.clone()),
        memory_bytes: args.memory,
        cpus: args.cpus,
        pids_limit: args.pids_limit,
        seccomp,
        read_only: args.read_only,
    };
    spec::apply(&mut target.spec, &overrides)?;

    // A pod of one: the foreground `brig` owns its microVM.
    let mut sandbox_spec = SandboxSpec::pod_of_one(id.clone(), config, &target.spec);
    let network = args
        .network
        .clone()
        .unwrap_or_else(|| config.network.clone());
    match network.as_str() {
        "bridge" => {
            let exposed = image.iter().flat_map(|i| i.published.iter().cloned());
            sandbox_spec.bridge = Some(args.publish.iter().cloned().chain(exposed).collect())
        }
        "none" => {}
        other => match other.strip_prefix("netns:") {
            Some(path) if std::path::Path::new(path).is_absolute() => {
                sandbox_spec.netns = Some(path.into())
            }
            _ => anyhow::bail!(
                "--network {other:?}: use bridge, none, or netns:/ABSOLUTE/PATH of a network namespace"
            ),
        },
    }
    anyhow::ensure!(
        (args.publish.is_empty() && !args.publish_all) || network == "bridge",
        "-p and -P publish ports of the bridge network: drop them or use --network bridge"
    );
    let resolv_conf = (network != "none" || !args.dns.is_empty()).then(|| resolv_conf(&args.dns));
    // A bundle's startContainer hooks read its path in their state.
    let bundle = target
        .bundle
        .then(|| std::path::absolute(&args.target).ok())
        .flatten();
    // A bundle's hooks run as `runc run` runs them: those of the host here, startContainer
    // ones in the guest (see `hooks`).
    let hooks = match &bundle {
        Some(_) => {
            crate::hooks::check(&target.spec)?;
            Some(crate::hooks::HostHooks {
                hooks: target.spec.hooks().clone(),
                netns: sandbox_spec.netns.clone(),
            })
        }
        None => None,
    };
    let container = ContainerConfig {
        id: id.clone(),
        spec: target.spec,
        rootfs: target.rootfs,
        volumes,
        stdin: args.interactive && !args.detach,
        bundle: bundle.clone(),
    };
    if args.detach && std::env::var_os(DETACHED_ENV).is_none() {
        return detach(&id);
    }
    let output = if args.detach {
        Output::Logs(layout.container(&id))
    } else {
        Output::User {
            tty: args.tty,
            logs: (!args.rm).then(|| layout.container(&id)),
        }
    };
    let run = Run {
        layout,
        config,
        place: Place::Own(&sandbox_spec),
        container: &container,
        resolv_conf,
        hostname: overrides.hostname.clone(),
        output,
        image: image.map(|i| i.image),
        memory: args.memory,
        remove: args.rm,
        bundle,
        hooks,
        gate: None,
    };
    run.execute_here()
}

impl Run<'_> {
    /// Run it on a tokio runtime of its own, to the container's exit status.
    pub(crate) fn execute_here(self) -> anyhow::Result<u8> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting tokio")?;
        let code = rt.block_on(self.execute());
        // Stdin may still be blocked in a read: leave without waiting for it.
        rt.shutdown_background();
        code
    }
}

/// Set in the environment of the background `brig` that owns a detached container.
const DETACHED_ENV: &str = "BRIG_DETACHED";

/// `-d`: start this same command again in the background (its own session), wait until it
/// says the container started, print the ID.
fn detach(id: &str) -> anyhow::Result<u8> {
    use std::io::{BufRead, Read};
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding brig's own binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(DETACHED_ENV, id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the background brig")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufReader::new(out).read_line(&mut line);
    }
    if line.trim() == format!("started {id}") {
        // The container runs on whether or not anyone still reads its ID.
        crate::outln!("{id}")?;
        return Ok(0);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().context("waiting for the background brig")?;
    eprint!("{err}");
    Ok(status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .filter(|c| *c != 0)
        .unwrap_or(EXIT_BRIG_ERROR))
}

/// Where a container's output goes.
pub(crate) enum Output {
    /// The user's terminal or pipes (foreground), and a copy in `stdout.log`/`stderr.log`
    /// in `logs` for a container that is kept after it exits.
    User { tty: bool, logs: Option<PathBuf> },
    /// `stdout.log` and `stderr.log` in this directory (detached).
    Logs(PathBuf),
}

/// The container's /etc/resolv.conf: `dns` as its servers, else the host's servers (a
/// loopback resolver of the host, such as systemd-resolved's stub, is not reachable from
/// the container), else a public one, as docker does.
fn resolv_conf(dns: &[std::net::IpAddr]) -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut out = String::new();
    let mut servers: Vec<String> = dns.iter().map(|ip| ip.to_string()).collect();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(ip) = words
                    .next()
                    .and_then(|w| w.parse::<std::net::IpAddr>().ok())
                {
                    if dns.is_empty() && !ip.is_loopback() {
                        servers.push(ip.to_string());
                    }
                }
            }
            Some("search" | "options" | "domain") => {
                out.push_str(line);
                out.push('\n');
            }
            _ => {}
        }
    }
    if servers.is_empty() {
        servers = vec!["8.8.8.8".into(), "8.8.4.4".into()];
    }
    let mut conf: String = servers
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect();
    conf.push_str(&out);
    conf
}

/// A container's /etc/hosts: the loopback names, and `hostname` on each of `addresses` (on
/// 127.0.1.1 without any, as Debian does, so the name always resolves).
fn hosts_file(hostname: &str, addresses: &[std::net::IpAddr]) -> String {
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    if addresses.is_empty() {
        hosts.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    for address in addresses {
        hosts.push_str(&format!("{address}\t{hostname}\n"));
    }
    hosts
}

/// Where a container runs.
pub(crate) enum Place<'a> {
    /// A microVM of its own, booted for it and ended with it (a pod of one).
    Own(&'a SandboxSpec),
    /// A pod's microVM, booted for the pod's sandbox container and left running when that
    /// container's command exits: the containers that joined it run on, until the sandbox
    /// container is deleted (`brig delete`, which removes the microVM).
    PodSandbox(&'a SandboxSpec),
    /// The microVM of a pod's sandbox container, which this container joins; it leaves the
    /// microVM when its command exits.
    Join(Box<PodSandbox>),
}

/// One container, from claiming its ID to its exit: `brig run`'s whole life, and that of
/// the keeper `brig create` leaves behind.
pub(crate) struct Run<'a> {
    pub(crate) layout: &'a Layout,
    pub(crate) config: &'a RuntimeConfig,
    /// Its microVM.
    pub(crate) place: Place<'a>,
    pub(crate) container: &'a ContainerConfig,
    /// Written into the container's state directory and bound on /etc/resolv.conf.
    pub(crate) resolv_conf: Option<String>,
    /// The name /etc/hosts gives the container's addresses (not for a bundle: it keeps the
    /// /etc/hosts of its own root filesystem).
    pub(crate) hostname: Option<String>,
    pub(crate) output: Output,
    pub(crate) memory: Option<u64>,
    pub(crate) remove: bool,
    /// The OCI bundle it comes from, for its record.
    pub(crate) bundle: Option<PathBuf>,
    /// A bundle's hooks that run on the host, at their moments.
    pub(crate) hooks: Option<crate::hooks::HostHooks>,
    /// `brig create`: once created, report it and wait for `brig start`.
    pub(crate) gate: Option<crate::create::StartGate>,
    /// The image it is made from and its overlay's scratch directory (`brig run IMAGE`).
    pub(crate) image: Option<ContainerImage>,
}

impl Run<'_> {
    pub(crate) async fn execute(self) -> anyhow::Result<u8> {
        let id = self.container.id.as_str();
        let sandbox_id = match &self.place {
            Place::Join(pod) => pod.vm_id(),
            Place::Own(_) | Place::PodSandbox(_) => id,
        };
        let mut record = Container::claim(
            self.layout,
            id,
            sandbox_id,
            self.container.spec.process().clone(),
        )?;
        record.set_owner(ProcessRef::current())?;
        if let Some(bundle) = &self.bundle {
            record.set_bundle(bundle.clone())?;
        }
        if let Some(image) = &self.image {
            record.set_image(image.name.clone(), image.scratch.clone())?;
            if let Ok(mut hold) = image.hold.lock() {
                hold.take();
            }
        }
        // The spec's cgroup (podman's, say): this process and the VMM it starts go there,
        // so the engine accounts and limits the whole microVM, as it does runc's processes.
        let cgroup = match self.cgroups_path() {
            Some(path) => match brig_runtime::cgroup::PodCgroup::enter(&path) {
                Ok(cgroup) => Some(cgroup),
                Err(e) => {
                    let _ = record.forget();
                    return Err(anyhow::Error::new(e).context("the container's cgroup"));
                }
            },
            None => None,
        };
        let result = self.run_in(&mut record).await;
        if let Some(cgroup) = cgroup {
            // A pod's microVM that runs on stays in it: its removal removes the cgroup.
            let vm_runs_on = matches!(self.place, Place::PodSandbox(_))
                && !brig_runtime::sandbox::vm_processes(self.layout.root(), sandbox_id).is_empty();
            if !vm_runs_on {
                cgroup.leave();
            }
        }
        if self.remove || result.is_err() {
            let state = record.state().clone();
            let _ = record.forget();
            // `brig run` of a bundle: its poststop hooks once it is gone. `brig create`'s
            // come with `brig delete`.
            if let (None, Some(hooks)) = (&self.gate, &self.hooks) {
                hooks.poststop(state).await;
            }
        }
        result
    }

    /// The spec's `linux.cgroupsPath`, if it has one.
    fn cgroups_path(&self) -> Option<String> {
        self.container
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.display().to_string())
    }

    async fn run_in(&self, record: &mut Container) -> anyhow::Result<u8> {
        let id = self.container.id.as_str();
        let mut container = self.container.clone();
        if let Some(conf) = &self.resolv_conf {
            let path = self.layout.container(id).join("resolv.conf");
            std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
            container.volumes.push(Volume {
                host: path,
                container: "/etc/resolv.conf".into(),
                read_only: true,
            });
        }
        let mut sandbox = match &self.place {
            Place::Own(spec) | Place::PodSandbox(spec) => Sandbox::start(self.config, spec).await?,
            Place::Join(pod) => pod.open(self.layout.root()).await?,
        };
        // /etc/hosts as docker writes it: localhost, and the container's hostname on its
        // addresses (known once the network is up).
        if let Some(hostname) = &self.hostname {
            let addresses: Vec<std::net::IpAddr> = sandbox
                .network()
                .map(|n| n.interface.addresses.iter().map(|a| a.address).collect())
                .unwrap_or_default();
            let path = self.layout.container(id).join("hosts");
            std::fs::write(&path, hosts_file(hostname, &addresses))
                .with_context(|| format!("writing {}", path.display()))?;
            container.volumes.push(Volume {
                host: path,
                container: "/etc/hosts".into(),
                read_only: true,
            });
        }
        let stdio = match record.create(&sandbox, &container).await {
            Ok(stdio) => stdio,
            Err(e) => {
                eprintln!("brig: {e}");
                self.end(sandbox, record, false).await;
                return Ok(e.command_status().unwrap_or(EXIT_BRIG_ERROR));
            }
        };
        match self.run_created(record, &mut sandbox, stdio).await {
            Ok(code) => {
                self.end(sandbox, record, true).await;
                Ok(code)
            }
            Err(e) => {
                self.end(sandbox, record, false).await;
                Err(e)
            }
        }
    }

    /// Done with the microVM: end it if it is the container's own (or, unless `pod_lives`,
    /// the pod's it booted), leave it if the container joined it.
    async fn end(&self, sandbox: Sandbox, record: &Container, pod_lives: bool) {
        match &self.place {
            Place::Own(_) => {
                // One container per microVM: stopping the microVM removes the container with
                // it (the agent syncs first), so no RemoveContainer round trip.
                let _ = sandbox.stop().await;
            }
            Place::PodSandbox(_) if pod_lives => sandbox.leave_running(),
            Place::PodSandbox(_) => {
                let _ = sandbox.stop().await;
            }
            Place::Join(_) => {
                if let Err(e) = record.leave(&sandbox).await {
                    tracing::debug!("leaving the pod's microVM: {e}");
                }
            }
        }
    }

    /// From created to exited: the gate of `brig create`, start, relay, wait.
    async fn run_created(
        &self,
        record: &mut Container,
        sandbox: &mut Sandbox,
        stdio: brig_runtime::container::Stdio,
    ) -> anyhow::Result<u8> {
        let id = self.container.id.as_str();
        if let Some(hooks) = &self.hooks {
            // prestart, createRuntime and createContainer hooks before `create` returns; a
            // failing one stops the container, as runc does.
            hooks
                .run(crate::hooks::Moment::Created, record.state())
                .await?;
        }
        if let Some(gate) = &self.gate {
            gate.report_and_wait(&record.dir(), id).await?;
        }
        let tty = matches!(self.output, Output::User { tty: true, .. });
        let raw = tty.then(relay::RawTerminal::enter);
        if tty {
            if let Some((rows, cols)) = relay::terminal_size() {
                let _ = sandbox
                    .agent()
                    .resize_tty(id, "", rows.into(), cols.into())
                    .await;
            }
        }
        if let Err(e) = record.start(sandbox).await {
            if self.gate.is_some() {
                // `brig start` waits for the record to leave `created`, and a record that is
                // gone is a start that failed. Gone before the microVM ends, or it would read
                // as stopped: a start that ran (a startContainer hook refused it, say).
                let _ = self.layout.remove_container(id);
            }
            return Err(vm_gone(sandbox, e.into()).await);
        }
        if let Some(hooks) = &self.hooks {
            // A failing poststart hook is a warning: the container runs on (the spec's rule).
            if let Err(e) = hooks
                .run(crate::hooks::Moment::Started, record.state())
                .await
            {
                eprintln!("brig: warning: {e:#}");
            }
        }
        let forwarding = forward_signals(sandbox, id, tty);
        match &self.output {
            Output::User { logs, .. } => relay::relay(stdio, logs.as_deref()).await,
            Output::Logs(dir) => {
                // Tell the waiting `brig run -d` we are up, then stop writing to it. A
                // waiter that is gone (killed meanwhile) must not take the container along.
                let _ = crate::outln!("started {id}");
                let _ = std::io::Write::flush(&mut std::io::stdout());
                relay::detach_stdio();
                relay::to_logs(stdio, dir).await;
            }
        }
        let status = match record.wait(sandbox).await {
            Ok(status) => status,
            Err(e) => return Err(vm_gone(sandbox, e.into()).await),
        };
        forwarding.abort();
        drop(raw);
        if status.oom_killed {
            let limit = self
                .memory
                .map(|b| format!(" ({} MiB)", b >> 20))
                .unwrap_or_default();
            eprintln!("brig: container {id} was killed because it reached its memory limit{limit}");
        }
        Ok(u8::try_from(status.code).unwrap_or(EXIT_BRIG_ERROR))
    }
}

/// An agent call failed: if it was because the microVM stopped, say that (the VMM's own last
/// words included) rather than only what the call saw.
async fn vm_gone(sandbox: &mut Sandbox, err: anyhow::Error) -> anyhow::Error {
    // The VMM's exit can trail the closed connection by a moment.
    for _ in 0..20 {
        if let Some(why) = sandbox.vmm_exit() {
            return err.context(why);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    err
}

/// Forward the signals a user sends to `brig` (Ctrl-C, kill) to the container's init.
/// With a terminal, Ctrl-C travels as a byte through the terminal instead.
fn forward_signals(sandbox: &Sandbox, id: &str, tty: bool) -> tokio::task::JoinHandle<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let agent = sandbox.agent().clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let kinds = [
            (SignalKind::interrupt(), libc::SIGINT),
            (SignalKind::terminate(), libc::SIGTERM),
            (SignalKind::hangup(), libc::SIGHUP),
            (SignalKind::quit(), libc::SIGQUIT),
            (SignalKind::window_change(), libc::SIGWINCH),
        ];
        let (tx, mut rx) = tokio::sync::mpsc::channel::<i32>(16);
        for (kind, num) in kinds {
            let Ok(mut s) = signal(kind) else { continue };
            let tx = tx.clone();
            tokio::spawn(async move {
                while s.recv().await.is_some() {
                    if tx.send(num).await.is_err() {
                        return;
                    }
                }
            });
        }
        while let Some(num) = rx.recv().await {
            if num == libc::SIGWINCH {
                if let (true, Some((rows, cols))) = (tty, relay::terminal_size()) {
                    let _ = agent.resize_tty(&id, "", rows.into(), cols.into()).await;
                }
                continue;
            }
            let _ = agent.signal_process(&id, "", num as u32, false).await;
        }
    })
}

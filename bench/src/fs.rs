//! `brig-bench fs`: brig-vmm's in-process virtio-fs against QEMU + virtiofsd, one guest of
//! each per cache mode, and against the host itself, on one tmpfs directory, in one host
//! session. Prints a markdown report on stdout.
//!
//! Every guest has the same kernel, initramfs, memory and single vCPU, the same share layout
//! (the runtime's: the container's rootfs and its volume bind-mounted under the shared
//! directory, mounted by the agent at /run/brig/shared) and gets the same CreateContainer
//! request: only the file server differs. The workload, `brig-fsbench`, runs as the
//! container's command without stdio and leaves its results in the directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use brig_protocols::agent::StdioPorts;
use brig_runtime::agent::AgentClient;
use brig_runtime::container::{share_container, ContainerConfig, SharedContainer, Volume};
use brig_runtime::sandbox::DEFAULT_GUEST_CMDLINE;
use brig_runtime::share::{self, SHARE_TAG};
use brig_runtime::spec::{self, Overrides};
use brig_runtime::{RuntimeConfig, Sandbox, SandboxSpec};
use tokio::process::{Child, Command};

use crate::median;

/// Arguments of `brig-bench fs`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The container's root filesystem (a static busybox tree).
    #[arg(long)]
    rootfs: PathBuf,
    /// virtiofsd binary (from crates.io: `cargo install --locked virtiofsd`).
    #[arg(long)]
    virtiofsd: PathBuf,
    /// Cache modes to measure, one guest each for brig-vmm (`fs_cache`) and for virtiofsd
    /// (`--cache`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "metadata,never,auto,always"
    )]
    modes: Vec<String>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// The workload binary (static); default: brig-fsbench next to this program.
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Size of the file read and of the file written, MiB.
    #[arg(long, default_value_t = 256)]
    file_mib: usize,
    /// Files listed + stat'ed, and files created and unlinked.
    #[arg(long, default_value_t = 2000)]
    files: usize,
    /// Rounds (each measures every column once, interleaved); the report shows medians.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Deadline of one guest (boot, workload, power-off), seconds.
    #[arg(long, default_value_t = 900)]
    deadline: u64,
    /// RLIMIT_NOFILE for every process started (brig-vmm inherits it): by default what
    /// virtiofsd gives itself, min(1 000 000, /proc/sys/fs/nr_open); 0 leaves it unchanged.
    #[arg(long, default_value_t = 1_000_000)]
    nofile: u64,
    /// Scratch directory (a tmpfs is mounted below it); removed at the end.
    #[arg(long, default_value = "/run/brig-bench-fs")]
    work: PathBuf,
}

/// Guest path of the volume holding the workload and its directory.
const GUEST_VOLUME: &str = "/bench";
const CONTAINER_ID: &str = "fsbench";
/// How long QEMU and virtiofsd get to exit after the guest powered off.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// One measurement of one column: the workload's `key value` results and the host-clock
/// time from starting the workload to its exit status.
struct Sample {
    results: BTreeMap<String, f64>,
    wall: Duration,
}

/// Who serves the directory.
#[derive(Clone, Copy, PartialEq)]
enum Server {
    /// Nobody: the workload runs on the host itself.
    Host,
    BrigVmm,
    Virtiofsd,
}

struct Column {
    name: String,
    server: Server,
    /// Cache mode (empty for the host).
    mode: String,
    samples: Vec<Sample>,
    errors: Vec<String>,
}

/// A directory of ours, removed on drop however we leave: every mount below it is detached
/// first and nothing is deleted across a mount (see `share::remove`).
pub(crate) struct Scratch(pub(crate) PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = share::remove(&self.0) {
            eprintln!("bench: cleaning up {}: {e}", self.0.display());
        }
    }
}

pub fn run(mut args: Args) -> Result<()> {
    args.modes.retain(|m| !m.is_empty()); // `--modes ''`: brig-vmm and the host only
    let mut config = RuntimeConfig::load()?;
    config.root = args.work.join("brig");
    let workload = match &args.workload {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("brig-fsbench"),
    };
    share::remove(&args.work)
        .with_context(|| format!("removing the old {}", args.work.display()))?;
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    let _work = Scratch(args.work.clone());
    let volume = args.work.join("volume");
    mount_tmpfs(&volume, 2 * args.file_mib as u64 + 64)?;
    let data = prepare_volume(&volume, &workload, &args)?;
    let container = container_config(&args, &volume)?;
    let virtiofsd_version = version_line(&args.virtiofsd, "--version")?;
    let qemu_version = version_line(&args.qemu, "--version")?;

    let nofile = raise_nofile(args.nofile)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let deadline = Duration::from_secs(args.deadline);
    let column = |server, mode: &str| {
        let name = match server {
            Server::Host => "L1 (host)".to_string(),
            Server::BrigVmm => format!("brig-vmm {mode}"),
            Server::Virtiofsd => format!("virtiofsd {mode}"),
        };
        Column {
            name,
            server,
            mode: mode.to_string(),
            samples: vec![],
            errors: vec![],
        }
    };
    // Interleaved: each mode of brig-vmm right before the same mode of virtiofsd.
    let mut columns = vec![column(Server::Host, "")];
    for mode in &args.modes {
        columns.push(column(Server::BrigVmm, mode));
        columns.push(column(Server::Virtiofsd, mode));
    }
    let ncolumns = columns.len();
    let mut sandbox_modes = BTreeMap::new();
    for round in 0..args.runs {
        for (i, column) in columns.iter_mut().enumerate() {
            reset(&data)?;
            eprintln!("bench: round {round}: {}", column.name);
            let mode = &column.mode;
            let wall = match column.server {
                Server::Host => run_on_host(&volume, &data, &args),
                Server::BrigVmm => {
                    let config = RuntimeConfig {
                        fs_cache: mode.clone(),
                        ..config.clone()
                    };
                    let id = format!("fsbench-{mode}-{round}");
                    bounded(&rt, deadline, run_brig(&config, &args, &container, &id))
                }
                Server::Virtiofsd => {
                    let cid = 100 + (round * ncolumns + i) as u32;
                    let dir = args.work.join(format!("qemu-{mode}-{round}"));
                    bounded(
                        &rt,
                        deadline,
                        run_qemu(&config, &args, &container, mode, cid, &dir),
                    )
                    .map(|(wall, sandbox)| {
                        sandbox_modes.insert(mode.clone(), sandbox);
                        wall
                    })
                }
            };
            match wall.and_then(|wall| {
                Ok(Sample {
                    results: collect(&data, args.file_mib)?,
                    wall,
                })
            }) {
                Ok(sample) => {
                    eprintln!(
                        "bench: round {round}: {}: {:?}",
                        column.name, sample.results
                    );
                    column.samples.push(sample);
                }
                Err(e) => {
                    // The workload's own words, if it got far enough to leave them.
                    let said = std::fs::read_to_string(data.join("results")).unwrap_or_default();
                    let e = match said.lines().find(|l| l.starts_with("error ")) {
                        Some(line) => e.context(format!("workload: {line}")),
                        None => e,
                    };
                    eprintln!("bench: round {round}: {} failed: {e:#}", column.name);
                    column.errors.push(format!("round {round}: {e:#}"));
                }
            }
        }
    }
    report(
        &args,
        &config,
        &columns,
        &virtiofsd_version,
        &qemu_version,
        &sandbox_modes,
        nofile,
    );
    let failed: usize = columns.iter().map(|c| c.errors.len()).sum();
    if failed > 0 {
        bail!("{failed} measurement(s) failed (see the report)");
    }
    Ok(())
}

/// Set this process's RLIMIT_NOFILE (inherited by all it starts) the way virtiofsd sets its
/// own: to min(`limit`, /proc/sys/fs/nr_open), else to the hard limit. Returns the soft limit
/// before and after.
fn raise_nofile(limit: u64) -> Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if limit == 0 || soft >= limit {
        return Ok((soft, soft));
    }
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .context("reading /proc/sys/fs/nr_open")?
        .trim()
        .parse()
        .context("parsing /proc/sys/fs/nr_open")?;
    let target = limit.min(nr_open);
    if setrlimit(Resource::RLIMIT_NOFILE, target, target).is_ok() {
        return Ok((soft, target));
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .context("raising RLIMIT_NOFILE to its hard limit")?;
    Ok((soft, hard))
}

/// Run `fut` on `rt` with a deadline.
fn bounded<T>(
    rt: &tokio::runtime::Runtime,
    deadline: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    rt.block_on(async { tokio::time::timeout(deadline, fut).await })
        .map_err(|_| anyhow::anyhow!("no result within the deadline of {deadline:?}"))?
}

fn mount_tmpfs(dir: &Path, size_mib: u64) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let options = format!("size={size_mib}m,mode=0755");
    mount(
        Some("brig-bench-fs"),
        dir,
        Some("tmpfs"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .with_context(|| format!("mounting a tmpfs on {}", dir.display()))
}

/// Fill the volume: the workload binary, and in `data/` the file to read and the files to
/// list. Returns the data directory.
fn prepare_volume(volume: &Path, workload: &Path, args: &Args) -> Result<PathBuf> {
    let copy = volume.join("brig-fsbench");
    std::fs::copy(workload, &copy)
        .with_context(|| format!("copying the workload {}", workload.display()))?;
    let data = volume.join("data");
    let files = data.join("files");
    std::fs::create_dir_all(&files).with_context(|| format!("creating {}", files.display()))?;
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let mut read = std::fs::File::create(data.join("read.bin")).context("creating read.bin")?;
    for _ in 0..args.file_mib {
        std::io::Write::write_all(&mut read, &chunk).context("writing read.bin")?;
    }
    for i in 0..args.files {
        std::fs::write(files.join(format!("f{i:05}")), &chunk[..4096])
            .context("creating the files to list")?;
    }
    Ok(data)
}

/// The container every guest runs: the workload on the volume, no stdio.
fn container_config(args: &Args, volume: &Path) -> Result<ContainerConfig> {
    let mut target = spec::load_target(&args.rootfs)?;
    let guest = |p: &str| format!("{GUEST_VOLUME}/{p}");
    let cmd = [
        guest("brig-fsbench"),
        guest("data"),
        args.file_mib.to_string(),
        args.files.to_string(),
    ];
    spec::apply(
        &mut target.spec,
        &Overrides {
            args: cmd.to_vec(),
            ..Default::default()
        },
    )?;
    Ok(ContainerConfig {
        id: CONTAINER_ID.into(),
        spec: target.spec,
        rootfs: target.rootfs,
        volumes: vec![Volume {
            host: volume.to_path_buf(),
            container: GUEST_VOLUME.into(),
            read_only: false,
        }],
        stdin: false,
        bundle: None,
    })
}

/// Remove what a workload run leaves in the data directory.
fn reset(data: &Path) -> Result<()> {
    for f in ["write.bin", "results", "results.tmp"] {
        match std::fs::remove_file(data.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).context(format!("removing {f}"))
            }
            _ => {}
        }
    }
    if data.join("created").exists() {
        std::fs::remove_dir_all(data.join("created")).context("removing created/")?;
    }
    Ok(())
}

/// Read the workload's results and check that its written file reached the host whole.
fn collect(data: &Path, file_mib: usize) -> Result<BTreeMap<String, f64>> {
    let text =
        std::fs::read_to_string(data.join("results")).context("the workload left no results")?;
    if let Some(e) = text.lines().find_map(|l| l.strip_prefix("error ")) {
        bail!("the workload failed: {e}");
    }
    let results: BTreeMap<String, f64> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    if results.get("done") != Some(&1.0) {
        bail!("the workload's results are incomplete:\n{text}");
    }
    let written = std::fs::metadata(data.join("write.bin"))
        .context("write.bin is missing on the host")?
        .len();
    if written != (file_mib as u64) << 20 {
        bail!(
            "write.bin has {written} bytes on the host, expected {}",
            (file_mib as u64) << 20
        );
    }
    Ok(results)
}

fn run_on_host(volume: &Path, data: &Path, args: &Args) -> Result<Duration> {
    let started = Instant::now();
    let status = std::process::Command::new(volume.join("brig-fsbench"))
        .arg(data)
        .arg(args.file_mib.to_string())
        .arg(args.files.to_string())
        .stdout(Stdio::null())
        .status()
        .context("running brig-fsbench")?;
    let wall = started.elapsed();
    if !status.success() {
        bail!("brig-fsbench exited with {status}");
    }
    Ok(wall)
}

/// Create, start and wait for the workload container; returns start → exit status.
async fn run_container(agent: &AgentClient, shared: &SharedContainer) -> Result<Duration> {
    agent
        .create_container(
            CONTAINER_ID,
            shared.spec_json.clone(),
            shared.rootfs.clone(),
            StdioPorts::new(),
        )
        .await
        .context("CreateContainer")?;
    let started = Instant::now();
    agent
        .start_container(CONTAINER_ID)
        .await
        .context("StartContainer")?;
    let status = agent
        .wait_process(CONTAINER_ID, "")
        .await
        .context("WaitProcess")?;
    let wall = started.elapsed();
    agent
        .remove_container(CONTAINER_ID)
        .await
        .context("RemoveContainer")?;
    if status.exit_status != 0 {
        bail!("the workload exited with {}", status.exit_status);
    }
    Ok(wall)
}

async fn run_brig(
    config: &RuntimeConfig,
    args: &Args,
    container: &ContainerConfig,
    id: &str,
) -> Result<Duration> {
    let mut spec = SandboxSpec::new(id, config);
    spec.cpus = 1;
    spec.memory_mib = args.memory;
    spec.share = true;
    let sandbox = Sandbox::start(config, &spec)
        .await
        .context("starting brig-vmm")?;
    let share = sandbox.share_dir().context("the sandbox has no share")?;
    let shared = share_container(&share, container)?;
    let wall = run_container(sandbox.agent(), &shared).await;
    let wall = wall.map_err(|e| with_log(e, tail(&sandbox.console_log(), "guest console")));
    let status = sandbox.shutdown().await;
    let wall = wall?;
    let status = status.context("powering brig-vmm's guest off")?;
    if !status.success() {
        bail!("brig-vmm exited with {status}");
    }
    Ok(wall)
}

/// One QEMU guest with virtiofsd in cache `mode` serving a share of the same layout.
/// Returns start → exit status of the workload and the virtiofsd sandbox that worked.
async fn run_qemu(
    config: &RuntimeConfig,
    args: &Args,
    container: &ContainerConfig,
    mode: &str,
    cid: u32,
    dir: &Path,
) -> Result<(Duration, String)> {
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Dropped last (locals drop in reverse): QEMU, then virtiofsd, are killed first.
    let _scratch = Scratch(dir.to_path_buf());
    let shared_dir = dir.join("shared");
    std::fs::create_dir(&shared_dir)?;
    let shared = share_container(&shared_dir, container)?;
    let socket = dir.join("virtiofsd.sock");
    let (mut virtiofsd, sandbox) =
        start_virtiofsd(&args.virtiofsd, &shared_dir, mode, &socket, dir).await?;
    let console = dir.join("console.log");
    let mut qemu = qemu_guest(&args.qemu, config, args.memory, &console, &socket, cid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.log"))?)
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu")?;
    let logs = || {
        format!(
            "{}{}",
            tail(&dir.join("qemu.log"), "qemu stderr"),
            tail(&console, "guest console")
        )
    };
    let agent = connect_agent(&mut qemu, cid, config.boot_timeout)
        .await
        .map_err(|e| with_log(e, logs()))?;
    let wall = run_container(&agent, &shared)
        .await
        .map_err(|e| with_log(e, logs()));
    let _ = agent.shutdown().await;
    for (name, child) in [("qemu", &mut qemu), ("virtiofsd", &mut virtiofsd)] {
        if tokio::time::timeout(EXIT_GRACE, child.wait())
            .await
            .is_err()
        {
            eprintln!(
                "bench: {name} still runs {EXIT_GRACE:?} after the guest powered off; killing it"
            );
            let _ = child.kill().await;
        }
    }
    Ok((wall?, sandbox))
}

/// Start virtiofsd and wait for its socket. Tries its default namespace sandbox first, then
/// none (root in a nested lab may lack what namespaces need).
pub(crate) async fn start_virtiofsd(
    bin: &Path,
    shared_dir: &Path,
    mode: &str,
    socket: &Path,
    dir: &Path,
) -> Result<(Child, String)> {
    let mut failures = String::new();
    for sandbox in ["namespace", "none"] {
        let log = dir.join(format!("virtiofsd-{sandbox}.log"));
        let mut child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared_dir)
            .arg(format!("--cache={mode}"))
            .arg(format!("--sandbox={sandbox}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let started = Instant::now();
        while !socket.exists()
            && started.elapsed() < Duration::from_secs(20)
            && child.try_wait()?.is_none()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The socket is made before the sandbox is entered: give a failing sandbox time to show.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if socket.exists() && child.try_wait()?.is_none() {
            return Ok((child, sandbox.to_string()));
        }
        let _ = child.kill().await;
        let _ = std::fs::remove_file(socket);
        failures += &format!(
            "\n--sandbox={sandbox}: {}",
            std::fs::read_to_string(&log).unwrap_or_default().trim()
        );
    }
    bail!("virtiofsd --cache={mode} did not start:{failures}")
}

/// QEMU microvm booting Brig's kernel and initramfs, as `brig-bench fs` and `net-peer` run
/// it: one vCPU, `memory_mib` of memfd RAM shared with virtiofsd (vhost-user needs it), the
/// console into `console`, the share from the virtiofsd at `socket` and the agent on vsock
/// `cid`. The caller adds devices and stdio.
pub(crate) fn qemu_guest(
    qemu: &Path,
    config: &RuntimeConfig,
    memory_mib: u64,
    console: &Path,
    socket: &Path,
    cid: u32,
) -> Command {
    let memory = format!("{memory_mib}M");
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-M",
        "microvm,accel=kvm,acpi=off,memory-backend=mem",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        &memory,
        "-object",
        &format!("memory-backend-memfd,id=mem,size={memory},share=on"),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        &format!("file:{}", console.display()),
    ])
    .arg("-kernel")
    .arg(&config.kernel)
    .arg("-initrd")
    .arg(&config.initrd)
    // microvm has no i8042 for `reboot=k`: a triple fault resets, and -no-reboot exits.
    .args([
        "-append",
        &format!("{DEFAULT_GUEST_CMDLINE} reboot=t brig.share={SHARE_TAG}"),
        "-chardev",
        &format!("socket,id=fs,path={}", socket.display()),
        "-device",
        &format!("vhost-user-fs-device,chardev=fs,tag={SHARE_TAG}"),
        "-device",
        &format!("vhost-vsock-device,guest-cid={cid}"),
    ]);
    cmd
}

/// Connect to the agent of a QEMU guest over AF_VSOCK, retrying until it answers.
pub(crate) async fn connect_agent(
    qemu: &mut Child,
    cid: u32,
    timeout: Duration,
) -> Result<AgentClient> {
    let started = Instant::now();
    let mut last = String::from("none yet");
    loop {
        if let Some(status) = qemu.try_wait()? {
            bail!("qemu exited during boot: {status}");
        }
        if started.elapsed() > timeout {
            bail!("the agent did not answer within {timeout:?} (last error: {last})");
        }
        match ttrpc::asynchronous::Client::connect(&format!("vsock://{cid}:1024")).await {
            Ok(client) => {
                let agent = AgentClient::from_ttrpc(client);
                match agent.version().await {
                    Ok(_) => return Ok(agent),
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `e` followed by a log excerpt.
pub(crate) fn with_log(e: anyhow::Error, log: String) -> anyhow::Error {
    anyhow::anyhow!("{e:#}{log}")
}

/// The last lines of a log file, for an error message.
/// The last lines of a guest's console for an error: only the file's tail is read (a guest
/// decides how long it is), escaped.
pub(crate) fn tail(path: &Path, what: &str) -> String {
    let tail = brig_runtime::guest_text::file_tail(path, 20).join("\n");
    format!("\n--- {what} ({}) ---\n{tail}", path.display())
}

fn version_line(bin: &Path, flag: &str) -> Result<String> {
    let out = std::process::Command::new(bin)
        .arg(flag)
        .output()
        .with_context(|| format!("running {} {flag}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

/// A report row: which result, how to show it, and whether more is better.
struct Row {
    title: String,
    key: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

fn rows(args: &Args) -> Vec<Row> {
    let n = thousands(args.files);
    let row = |title: String, key, unit, higher_is_better| Row {
        title,
        key,
        unit,
        higher_is_better,
    };
    vec![
        row(
            format!(
                "sequential read, {} MiB file made by the host, 1 MiB reads",
                args.file_mib
            ),
            "read_mbps",
            "MB/s",
            true,
        ),
        row(
            format!(
                "sequential write, {} MiB in 1 MiB writes + fsync",
                args.file_mib
            ),
            "write_mbps",
            "MB/s",
            true,
        ),
        row(
            format!("list + stat {n} files made by the host"),
            "stat_secs",
            "s",
            false,
        ),
        row(
            format!("create {n} small files (13 bytes each)"),
            "create_secs",
            "s",
            false,
        ),
        row(format!("unlink {n} files"), "unlink_secs", "s", false),
    ]
}

fn thousands(n: usize) -> String {
    if n >= 1000 {
        format!("{} {:03}", n / 1000, n % 1000)
    } else {
        n.to_string()
    }
}

fn value(column: &Column, key: &str) -> Option<f64> {
    let values: Vec<f64> = column
        .samples
        .iter()
        .filter_map(|s| s.results.get(key).copied())
        .collect();
    (!values.is_empty()).then(|| median(values))
}

fn show(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if unit == "s" => format!("{v:.3} s"),
        Some(v) => format!("{v:.1} {unit}"),
        None => "failed".into(),
    }
}

/// The best of `modes` (value, name) on a row.
fn best_of<'a>(higher_is_better: bool, modes: &[(f64, &'a str)]) -> Option<(f64, &'a str)> {
    modes.iter().copied().max_by(|a, b| {
        if higher_is_better {
            a.0.total_cmp(&b.0)
        } else {
            b.0.total_cmp(&a.0)
        }
    })
}

/// brig-vmm's speed over that of the best of `modes` (value, name) on one row, as a ratio
/// that is > 1 when brig-vmm is faster whether the row is a rate or a time; and that mode.
fn versus_best<'a>(
    higher_is_better: bool,
    brig: f64,
    modes: &[(f64, &'a str)],
) -> Option<(f64, &'a str)> {
    let best = best_of(higher_is_better, modes)?;
    let ratio = if higher_is_better {
        brig / best.0
    } else {
        best.0 / brig
    };
    Some((ratio, best.1))
}

fn report(
    args: &Args,
    config: &RuntimeConfig,
    columns: &[Column],
    virtiofsd_version: &str,
    qemu_version: &str,
    sandbox_modes: &BTreeMap<String, String>,
    nofile: (u64, u64),
) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let sandboxes: Vec<String> = sandbox_modes
        .iter()
        .map(|(m, s)| format!("{m}: {s}"))
        .collect();
    println!("# File-system benchmark: brig-vmm's in-process virtio-fs vs QEMU + virtiofsd\n");
    println!(
        "- host: kernel {} ({}); one host session, {} round(s), columns interleaved; medians shown",
        kernel.trim(),
        crate::run::host_note(),
        args.runs
    );
    println!("- the directory: a tmpfs on the host; before each column the host made a {} MiB file to read and {} files to list (so no guest has them cached)", args.file_mib, thousands(args.files));
    println!("- guests: 1 vCPU, {} MiB, {} + {}; the workload (`brig-fsbench`, static) runs as a container of the busybox rootfs, its directory a volume; same share layout and same CreateContainer request for every guest, only the file server differs", args.memory, config.kernel.display(), config.initrd.display());
    println!("- brig-vmm: in-process virtio-fs (fuse-backend-rs passthrough), its cache mode set with `fs_cache` (configured default here: {}), hybrid vsock", config.fs_cache);
    println!("- QEMU ({qemu_version}): `-M microvm,accel=kvm,acpi=off`, memfd guest RAM (`share=on`), `vhost-user-fs-device` + `vhost-vsock-device`; {virtiofsd_version}, defaults except `--cache`; its sandbox: {}", if sandboxes.is_empty() { "none started".to_string() } else { sandboxes.join(", ") });
    println!("- RLIMIT_NOFILE (soft) of every process started here, brig-vmm included: {} (was {}); virtiofsd sets its own (by default to the same)", nofile.1, nofile.0);
    println!("- times and rates are the workload's own (CLOCK_MONOTONIC inside the guest); MB = 10^6 bytes\n");
    // Each server's best mode on a row: (value, mode).
    let modes = |server: Server, row: &Row| -> Vec<(f64, &str)> {
        columns
            .iter()
            .filter(|c| c.server == server)
            .filter_map(|c| Some((value(c, row.key)?, c.mode.as_str())))
            .collect()
    };
    let header: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
    println!(
        "| measurement | {} | best brig-vmm ÷ best virtiofsd | goal met |",
        header.join(" | ")
    );
    println!("|---|{}---:|:---:|", "---:|".repeat(columns.len()));
    let mut met = 0;
    let all_rows = rows(args);
    for row in &all_rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| show(value(c, row.key), row.unit))
            .collect();
        // brig-vmm's best mode against virtiofsd's best mode.
        let brig = modes(Server::BrigVmm, row);
        let brig_best = best_of(row.higher_is_better, &brig);
        let versus = brig_best.and_then(|(b, bm)| {
            Some((
                versus_best(row.higher_is_better, b, &modes(Server::Virtiofsd, row))?,
                bm,
            ))
        });
        let (ratio, goal) = match versus {
            Some(((r, mode), brig_mode)) => {
                if r >= 1.0 {
                    met += 1;
                }
                (
                    format!("{r:.2} ({brig_mode} vs {mode})"),
                    if r >= 1.0 { "yes" } else { "no" },
                )
            }
            None => ("n/a".to_string(), "n/a"),
        };
        let better = if row.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        println!(
            "| {} ({}, {better}) | {} | {ratio} | {goal} |",
            row.title,
            row.unit,
            cells.join(" | ")
        );
    }
    println!("\n\"best brig-vmm ÷ best virtiofsd\" is the speed of brig-vmm's best mode over that of virtiofsd's best mode on that row (for times: virtiofsd's best time over brig-vmm's); ≥ 1.00 meets the goal that brig-vmm at least matches virtiofsd's best mode.");
    println!("\nGoal met on {met} of {} rows.", all_rows.len());
    println!("\nClock cross-check, per column: the workload's phases summed (guest clock) / start → exit status (host clock), round 0:\n");
    for c in columns {
        if let Some(s) = c.samples.first() {
            let sum: f64 = [
                "read_secs",
                "write_secs",
                "stat_secs",
                "create_secs",
                "unlink_secs",
            ]
            .iter()
            .filter_map(|k| s.results.get(*k))
            .sum();
            println!("- {}: {sum:.2} s / {:.2} s", c.name, s.wall.as_secs_f64());
        }
    }
    if args.runs > 1 {
        println!("\nAll samples (read MB/s, write MB/s, stat s, create s, unlink s):\n");
        for c in columns {
            let samples: Vec<String> = c
                .samples
                .iter()
                .map(|s| {
                    let v: Vec<String> = all_rows
                        .iter()
                        .map(|r| {
                            format!("{:.3}", s.results.get(r.key).copied().unwrap_or(f64::NAN))
                        })
                        .collect();
                    v.join(" / ")
                })
                .collect();
            println!("- {}: {}", c.name, samples.join("; "));
        }
    }
    let errors: Vec<String> = columns
        .iter()
        .flat_map(|c| c.errors.iter().map(move |e| format!("- {}: {e}", c.name)))
        .collect();
    if !errors.is_empty() {
        println!("\nFailures:\n\n{}", errors.join("\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brig_is_compared_with_the_best_mode_of_each_row() {
        let rates = [(150.0, "metadata"), (80.0, "never")];
        let (r, mode) = versus_best(true, 120.0, &rates).unwrap();
        assert_eq!(mode, "metadata");
        assert!((r - 0.8).abs() < 1e-9);
        let times = [(18.0, "metadata"), (9.0, "auto")];
        let (r, mode) = versus_best(false, 6.0, &times).unwrap();
        assert_eq!(mode, "auto");
        assert!(
            (r - 1.5).abs() < 1e-9,
            "faster than the best time gives > 1"
        );
        assert!(versus_best(true, 1.0, &[]).is_none());
    }

    #[test]
    fn results_count_only_when_complete_and_the_write_reached_the_host() {
        let dir = std::env::temp_dir().join(format!("brig-fsbench-collect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("write.bin"), vec![0u8; 1 << 20]).unwrap();
        std::fs::write(
            dir.join("results"),
            "read_mbps 12.5\nstat_secs 0.25\ndone 1\n",
        )
        .unwrap();
        let results = collect(&dir, 1).unwrap();
        assert_eq!(results["read_mbps"], 12.5);
        assert_eq!(results["stat_secs"], 0.25);
        let short = collect(&dir, 2).unwrap_err().to_string();
        assert!(short.contains("write.bin has 1048576 bytes"), "{short}");
        std::fs::write(dir.join("results"), "read_mbps 12.5\n").unwrap();
        assert!(collect(&dir, 1)
            .unwrap_err()
            .to_string()
            .contains("incomplete"));
        std::fs::write(
            dir.join("results"),
            "read_mbps 12.5\nerror open x: denied\n",
        )
        .unwrap();
        assert!(collect(&dir, 1)
            .unwrap_err()
            .to_string()
            .contains("open x: denied"));
        reset(&dir).unwrap();
        assert!(!dir.join("write.bin").exists() && !dir.join("results").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn counts_read_as_in_the_issue() {
        assert_eq!(thousands(2000), "2 000");
        assert_eq!(thousands(100), "100");
    }
}

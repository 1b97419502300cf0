//! `brig-bench net-peer`: the QEMU peer of the network benchmark (`make bench-net`). It runs
//! a pod's guest the way Kata Containers does with QEMU, and Brig's own guest in it: QEMU
//! microvm with virtio-net on vhost-net, virtiofsd for the container's rootfs and
//! vhost-vsock for the agent, Brig's kernel, initramfs and agent, and the pod's network
//! namespace wired exactly as Brig wires it (`runtime::net::attach`: a TAP beside the
//! pod's interface, tc redirects both ways, the guest NIC with the pod's MAC, addresses and
//! routes). So against a Brig pod on the same network only the VMM and its device back-ends
//! differ.
//!
//! It starts the container (the command after `--`), prints `ready` on stdout and serves
//! until its stdin closes; then it stops QEMU and virtiofsd and undoes the wiring.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use brig_protocols::agent::StdioPorts;
use brig_runtime::container::{share_container, ContainerConfig, Volume};
use brig_runtime::net;
use brig_runtime::share;
use brig_runtime::spec::{self, Overrides};
use brig_runtime::RuntimeConfig;
use tokio::io::AsyncReadExt;

use crate::fs::{connect_agent, qemu_guest, start_virtiofsd, tail, with_log, Scratch};

const CONTAINER_ID: &str = "netpeer";

/// Arguments of `brig-bench net-peer`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pod's network namespace (made by CNI), e.g. /var/run/netns/cni-….
    #[arg(long)]
    netns: PathBuf,
    /// The container's root filesystem (a static busybox tree).
    #[arg(long)]
    rootfs: PathBuf,
    /// A host directory the container sees read-only: HOST:CONTAINER (repeatable).
    #[arg(long = "ro-volume")]
    ro_volumes: Vec<String>,
    /// virtiofsd binary (from crates.io: `cargo install --locked virtiofsd`).
    #[arg(long)]
    virtiofsd: PathBuf,
    /// virtiofsd's cache mode (Brig's default `fs_cache` is auto).
    #[arg(long, default_value = "auto")]
    cache: String,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Guest memory, MiB (a Brig pod's default).
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// vsock CID of the guest.
    #[arg(long, default_value_t = 4242)]
    cid: u32,
    /// Scratch directory; removed at the end.
    #[arg(long, default_value = "/run/brig-bench-net-peer")]
    work: PathBuf,
    /// The container's command and arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let config = RuntimeConfig::load()?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(serve(&config, &args))
}

async fn serve(config: &RuntimeConfig, args: &Args) -> Result<()> {
    share::remove(&args.work)
        .with_context(|| format!("removing the old {}", args.work.display()))?;
    std::fs::create_dir_all(&args.work)
        .with_context(|| format!("creating {}", args.work.display()))?;
    // Dropped last: QEMU and virtiofsd (kill_on_drop) go before the shares are unmounted.
    let _work = Scratch(args.work.clone());
    let attached = net::attach(&args.netns)?
        .with_context(|| format!("{} has no interface but loopback", args.netns.display()))?;
    let result = serve_attached(config, args, &attached).await;
    let detached = net::detach(&args.netns).context("undoing the pod network's wiring");
    result.and(detached)
}

async fn serve_attached(
    config: &RuntimeConfig,
    args: &Args,
    attached: &net::Attached,
) -> Result<()> {
    let container = container_config(args)?;
    let shared_dir = args.work.join("shared");
    std::fs::create_dir(&shared_dir)?;
    let shared = share_container(&shared_dir, &container)?;
    let socket = args.work.join("virtiofsd.sock");
    let (_virtiofsd, _) = start_virtiofsd(
        &args.virtiofsd,
        &shared_dir,
        &args.cache,
        &socket,
        &args.work,
    )
    .await?;

    let console = args.work.join("console.log");
    let tap = attached.tap.as_raw_fd();
    let mac = net::mac_text(&attached.network.interface.mac);
    let mut qemu = qemu_guest(&args.qemu, config, args.memory, &console, &socket, args.cid);
    qemu.args([
        "-netdev",
        &format!("tap,id=net0,fd={tap},vhost=on"),
        "-device",
        &format!("virtio-net-device,netdev=net0,mac={mac}"),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(args.work.join("qemu.log"))?)
    .kill_on_drop(true);
    // SAFETY: between fork and exec the closure only calls fcntl(2), which is
    // async-signal-safe, on a descriptor the parent keeps open for the child's whole life.
    unsafe {
        qemu.pre_exec(move || {
            // QEMU gets the TAP as `fd=`: it must survive the exec.
            if libc::fcntl(tap, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut qemu = qemu.spawn().context("starting qemu")?;
    let logs = || {
        format!(
            "{}{}",
            tail(&args.work.join("qemu.log"), "qemu stderr"),
            tail(&console, "guest console")
        )
    };
    let agent = connect_agent(&mut qemu, args.cid, config.boot_timeout)
        .await
        .map_err(|e| with_log(e, logs()))?;
    agent
        .configure_network(&attached.network)
        .await
        .context("ConfigureNetwork")?;
    agent
        .create_container(
            CONTAINER_ID,
            shared.spec_json.clone(),
            shared.rootfs.clone(),
            StdioPorts::new(),
        )
        .await
        .context("CreateContainer")?;
    agent
        .start_container(CONTAINER_ID)
        .await
        .context("StartContainer")?;
    println!("ready");

    // Serve until stdin closes (or QEMU dies).
    let mut stdin = tokio::io::stdin();
    let mut sink = Vec::new();
    tokio::select! {
        _ = stdin.read_to_end(&mut sink) => {}
        status = qemu.wait() => bail!("qemu exited while serving: {status:?}{}", logs()),
    }
    let _ = qemu.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), qemu.wait()).await;
    Ok(())
}

/// The container: the rootfs, the read-only volumes and the command; no stdio.
fn container_config(args: &Args) -> Result<ContainerConfig> {
    let mut target = spec::load_target(&args.rootfs)?;
    spec::apply(
        &mut target.spec,
        &Overrides {
            args: args.command.clone(),
            ..Default::default()
        },
    )?;
    let mut volumes = Vec::new();
    for v in &args.ro_volumes {
        let Some((host, container)) = v.split_once(':') else {
            bail!("--ro-volume {v}: expected HOST:CONTAINER");
        };
        volumes.push(Volume {
            host: host.into(),
            container: container.into(),
            read_only: true,
        });
    }
    Ok(ContainerConfig {
        id: CONTAINER_ID.into(),
        spec: target.spec,
        rootfs: target.rootfs,
        volumes,
        stdin: false,
        bundle: None,
    })
}

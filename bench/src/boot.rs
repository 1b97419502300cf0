//! Boot-time and VMM-memory comparison of `brig-vmm` against QEMU
//! (`-M microvm,accel=kvm,acpi=off` with `vhost-vsock-device`), same kernel and initramfs,
//! runs interleaved in one host session. Prints a markdown report on stdout.
//!
//! Measured per boot: process start → the agent's first answer over vsock (a ttrpc Version
//! call), and, while the guest idles, the VMM's own memory: its RSS and PSS minus the guest
//! RAM mapping (the VMM's binary, heap, stacks and device state).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::median;
use anyhow::{bail, Context, Result};
use brig_protocols::agent::{ShutdownRequest, VersionRequest};
use brig_protocols::agent_ttrpc_async::AgentClient;
use brig_runtime::{RuntimeConfig, Sandbox, SandboxSpec};

/// Arguments of `brig-bench boot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Boots of each VMM.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

struct Sample {
    boot: Duration,
    own_rss_kib: u64,
    own_pss_kib: u64,
}

pub fn run(args: Args) -> Result<()> {
    let mut config = RuntimeConfig::load()?;
    config.root = PathBuf::from("/run/brig-bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (mut brig, mut qemu) = (Vec::new(), Vec::new());
    // No single boot may hang the report: each gets a deadline, and progress goes to stderr.
    let deadline = Duration::from_secs(180);
    for i in 0..args.runs {
        let b = rt.block_on(async {
            tokio::time::timeout(deadline, boot_brig(&config, args.memory, i)).await
        });
        brig.push(
            b.map_err(|_| anyhow::anyhow!("brig-vmm boot {i} took over {deadline:?}"))?
                .context("brig-vmm boot")?,
        );
        eprintln!("bench: brig-vmm boot {i}: {:?}", brig[i].boot);
        let q = rt
            .block_on(async { tokio::time::timeout(deadline, boot_qemu(&config, &args, i)).await });
        qemu.push(
            q.map_err(|_| anyhow::anyhow!("qemu boot {i} took over {deadline:?}"))?
                .context("qemu boot")?,
        );
        eprintln!("bench: qemu boot {i}: {:?}", qemu[i].boot);
    }
    report(&args, &config, &brig, &qemu);
    Ok(())
}

async fn boot_brig(config: &RuntimeConfig, memory: u64, i: usize) -> Result<Sample> {
    let mut spec = SandboxSpec::new(format!("bench-{i}"), config);
    spec.memory_mib = memory;
    let sandbox = Sandbox::start(config, &spec).await?;
    let boot = sandbox.boot_time();
    let pid = sandbox.vmm_pid().context("brig-vmm pid")?;
    tokio::time::sleep(Duration::from_millis(300)).await; // let the guest settle into idle
                                                          // brig-vmm is two processes: the supervisor (`pid`) and the VM in its PID namespace.
    let mut own_rss_kib = 0;
    let mut own_pss_kib = 0;
    for pid in std::iter::once(pid).chain(children(pid)) {
        let (rss, pss) = own_memory(pid, memory << 10)?;
        own_rss_kib += rss;
        own_pss_kib += pss;
    }
    let status = sandbox.shutdown().await?;
    if !status.success() {
        bail!("brig-vmm exited with {status}");
    }
    Ok(Sample {
        boot,
        own_rss_kib,
        own_pss_kib,
    })
}

async fn boot_qemu(config: &RuntimeConfig, args: &Args, i: usize) -> Result<Sample> {
    let cid = 100 + i as u32;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&args.qemu)
        .args([
            "-M",
            "microvm,accel=kvm,acpi=off",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-nographic", "-no-reboot", "-serial", "null", "-m"])
        .arg(format!("{}M", args.memory))
        .arg("-kernel")
        .arg(&config.kernel)
        .arg("-initrd")
        .arg(&config.initrd)
        .args([
            "-append",
            "console=ttyS0 reboot=k panic=-1 pci=off nomodule quiet",
        ])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting qemu")?;
    let pid = child.id().context("qemu pid")?;
    let agent = loop {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("QEMU guest's agent did not answer in 120 s");
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("qemu exited during boot: {status}");
        }
        if let Ok(client) =
            ttrpc::asynchronous::Client::connect(&format!("vsock://{cid}:1024")).await
        {
            let agent = AgentClient::new(client);
            let ctx = ttrpc::context::with_timeout(5_000_000_000);
            if agent.version(ctx, &VersionRequest::new()).await.is_ok() {
                break agent;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let boot = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (own_rss_kib, own_pss_kib) = own_memory(pid, args.memory << 10)?;
    let _ = agent
        .shutdown(
            ttrpc::context::with_timeout(5_000_000_000),
            &ShutdownRequest::new(),
        )
        .await;
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(status) => {
            status?;
        }
        Err(_) => {
            child.kill().await?;
        }
    }
    Ok(Sample {
        boot,
        own_rss_kib,
        own_pss_kib,
    })
}

/// The children of `pid` (its main thread's).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// RSS and PSS of `pid` outside its guest-RAM mapping(s) (anonymous mappings at least as
/// large as the guest memory), in KiB.
fn own_memory(pid: u32, guest_kib: u64) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).context("reading smaps")?;
    let (mut rss, mut pss) = (0u64, 0u64);
    let mut guest_mapping = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let mut bounds = first
                .split('-')
                .map(|h| u64::from_str_radix(h, 16).unwrap_or(0));
            let (start, end) = (bounds.next().unwrap_or(0), bounds.next().unwrap_or(0));
            guest_mapping = (end - start) >> 10 >= guest_kib;
        } else if !guest_mapping {
            let value: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match first {
                "Rss:" => rss += value,
                "Pss:" => pss += value,
                _ => {}
            }
        }
    }
    Ok((rss, pss))
}

fn report(args: &Args, config: &RuntimeConfig, brig: &[Sample], qemu: &[Sample]) {
    let ms = |s: &[Sample]| median(s.iter().map(|x| x.boot.as_secs_f64() * 1000.0).collect());
    let mib = |s: &[Sample], f: fn(&Sample) -> u64| {
        median(s.iter().map(|x| f(x) as f64 / 1024.0).collect())
    };
    let (b_ms, q_ms) = (ms(brig), ms(qemu));
    let (b_rss, q_rss) = (mib(brig, |s| s.own_rss_kib), mib(qemu, |s| s.own_rss_kib));
    let (b_pss, q_pss) = (mib(brig, |s| s.own_pss_kib), mib(qemu, |s| s.own_pss_kib));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("# Boot benchmark: brig-vmm vs QEMU microvm\n");
    println!(
        "- host kernel: {} ({}), {} runs each, interleaved, {} MiB guests, 1 vCPU",
        kernel.trim(),
        kvm_note(),
        args.runs,
        args.memory
    );
    println!(
        "- guest: {} + {}",
        display(&config.kernel),
        display(&config.initrd)
    );
    println!("- QEMU: `-M microvm,accel=kvm,acpi=off -cpu host -device vhost-vsock-device`, agent reached over AF_VSOCK; brig-vmm: hybrid vsock over its Unix socket\n");
    println!("| metric (median) | brig-vmm | QEMU | ratio QEMU/brig |");
    println!("|---|---:|---:|---:|");
    println!(
        "| process start → agent's first vsock answer | {b_ms:.0} ms | {q_ms:.0} ms | {:.2}× |",
        q_ms / b_ms
    );
    println!("| VMM's own RSS (excl. guest RAM), idle guest | {b_rss:.1} MiB | {q_rss:.1} MiB | {:.1}× |", q_rss / b_rss);
    println!("| VMM's own PSS (excl. guest RAM), idle guest | {b_pss:.1} MiB | {q_pss:.1} MiB | {:.1}× |", q_pss / b_pss);
    println!("\nAll samples (boot ms / own RSS MiB):\n");
    for (i, (b, q)) in brig.iter().zip(qemu).enumerate() {
        println!(
            "- run {i}: brig {:.0} ms / {:.1} MiB; qemu {:.0} ms / {:.1} MiB",
            b.boot.as_secs_f64() * 1000.0,
            b.own_rss_kib as f64 / 1024.0,
            q.boot.as_secs_f64() * 1000.0,
            q.own_rss_kib as f64 / 1024.0
        );
    }
}

fn kvm_note() -> &'static str {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "PVM"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd; in the lab this is nested KVM under TCG, so absolute times are inflated"
    } else {
        "kvm"
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

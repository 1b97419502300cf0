//! `brig-bench run`: what a container run costs, next to runc in the same host session.
//!
//! Brig's run is driven through the same runtime calls `brig run --rm` makes, so the time
//! splits into the sandbox boot (VMM start → agent's first answer) and the rest (create,
//! start, wait, sync and stop the microVM). runc runs the same root filesystem as an OCI bundle.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use brig_runtime::container::{Container, ContainerConfig};
use brig_runtime::spec::{self, Overrides};
use brig_runtime::state::Layout;
use brig_runtime::{RuntimeConfig, Sandbox, SandboxSpec};
use tokio::io::AsyncReadExt;

use crate::median;

/// Arguments of `brig-bench run`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Runs of each.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The root filesystem to run (a static busybox tree).
    #[arg(long)]
    rootfs: PathBuf,
    /// runc binary.
    #[arg(long, default_value = "runc")]
    runc: PathBuf,
}

struct BrigSample {
    boot: Duration,
    rest: Duration,
    /// Of `rest`: CreateContainer with its stdio streams.
    create: Duration,
    /// Of `rest`: start until the exit status arrived.
    exec: Duration,
    /// Of `rest`: Shutdown (the agent syncs) until the VMM exited.
    teardown: Duration,
}

pub fn run(args: Args) -> Result<()> {
    let mut config = RuntimeConfig::load()?;
    config.root = PathBuf::from("/run/brig-bench-run");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bundle = runc_bundle(&args.rootfs)?;
    let mut brig = Vec::new();
    let mut runc = Vec::new();
    for i in 0..args.runs {
        brig.push(
            rt.block_on(brig_run(&config, &args.rootfs, i, &["true"]))
                .context("brig run")?
                .0,
        );
        runc.push(runc_run(&args.runc, &bundle, i)?);
    }
    let (_, meminfo, sandbox_pss_kib) = rt.block_on(brig_run(
        &config,
        &args.rootfs,
        args.runs,
        &["sh", "-c", "sleep 1; cat /proc/meminfo"],
    ))?;
    let kib = |key: &str| -> u64 {
        meminfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let guest_used_mib = (kib("MemTotal:") - kib("MemAvailable:")) as f64 / 1024.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let boot = median(brig.iter().map(|s| ms(s.boot)).collect());
    let rest = median(brig.iter().map(|s| ms(s.rest)).collect());
    let total = median(brig.iter().map(|s| ms(s.boot + s.rest)).collect());
    let runc_ms = median(runc.iter().map(|d| ms(*d)).collect());
    println!("# Run benchmark: brig run --rm ROOTFS true vs runc run\n");
    println!(
        "- {} runs each, interleaved, one host session; root filesystem {}",
        args.runs,
        args.rootfs.display()
    );
    println!("- host: {}\n", host_note());
    println!("| metric (median) | value |");
    println!("|---|---:|");
    println!("| brig: boot (VMM start → agent ready) | {boot:.0} ms |");
    println!("| brig: the rest (create, start, exit, sync, stop) | {rest:.0} ms |");
    println!(
        "| … of which create (CreateContainer + stdio streams) | {:.0} ms |",
        median(brig.iter().map(|s| ms(s.create)).collect())
    );
    println!(
        "| … of which start → exit status | {:.0} ms |",
        median(brig.iter().map(|s| ms(s.exec)).collect())
    );
    println!(
        "| … of which sync + stop the microVM | {:.0} ms |",
        median(brig.iter().map(|s| ms(s.teardown)).collect())
    );
    println!("| brig: whole run | {total:.0} ms |");
    println!("| runc run (whole) | {runc_ms:.0} ms |");
    println!(
        "| ratio brig rest / runc whole (goal ≤ 1) | {:.2} |",
        rest / runc_ms
    );
    println!(
        "| idle guest memory used (MemTotal − MemAvailable, inside) | {guest_used_mib:.1} MiB |"
    );
    println!("| host memory of the whole sandbox (brig-vmm PSS, guest RAM it touched included) | {:.1} MiB |", sandbox_pss_kib as f64 / 1024.0);
    println!("\nvirtio-fs against virtiofsd: see fs.md (`brig-bench fs`).");
    Ok(())
}

/// One `brig run --rm`: returns its timings, the container's stdout and the VMM's PSS (KiB)
/// sampled while the container ran.
async fn brig_run(
    config: &RuntimeConfig,
    rootfs: &Path,
    i: usize,
    cmd: &[&str],
) -> Result<(BrigSample, String, u64)> {
    let id = format!("bench-{i}");
    let mut target = spec::load_target(rootfs)?;
    let overrides = Overrides {
        args: cmd.iter().map(|s| s.to_string()).collect(),
        hostname: Some(id.clone()),
        ..Default::default()
    };
    spec::apply(&mut target.spec, &overrides)?;
    let container = ContainerConfig {
        id: id.clone(),
        spec: target.spec,
        rootfs: target.rootfs,
        volumes: vec![],
        stdin: false,
        bundle: None,
    };
    // The same calls, in the same order, as `brig run --rm` makes.
    let sandbox_spec = SandboxSpec::pod_of_one(id.clone(), config, &container.spec);
    let mut record = Container::claim(
        &Layout::new(&config.root),
        &id,
        &id,
        container.spec.process().clone(),
    )?;
    let started = Instant::now();
    let sandbox = Sandbox::start(config, &sandbox_spec).await?;
    let boot = started.elapsed();
    let rest_started = Instant::now();
    let stdio = record.create(&sandbox, &container).await?;
    let create = rest_started.elapsed();
    let exec_started = Instant::now();
    record.start(&sandbox).await?;
    let mut out = String::new();
    if let Some(mut s) = stdio.stdout {
        s.read_to_string(&mut out).await?;
    }
    // brig-vmm's supervisor and the VM process, its child in a PID namespace of its own.
    let pss = sandbox
        .vmm_pid()
        .map(|pid| {
            pss_kib(pid)
                + crate::boot::children(pid)
                    .into_iter()
                    .map(pss_kib)
                    .sum::<u64>()
        })
        .unwrap_or(0);
    let status = record.wait(&sandbox).await?;
    if status.code != 0 {
        bail!("container exited with {}", status.code);
    }
    let exec = exec_started.elapsed();
    let teardown_started = Instant::now();
    // As `brig run --rm` ends: the agent syncs, the VMM is stopped, the record forgotten.
    sandbox.stop().await?;
    record.forget()?;
    let teardown = teardown_started.elapsed();
    Ok((
        BrigSample {
            boot,
            rest: rest_started.elapsed(),
            create,
            exec,
            teardown,
        },
        out,
        pss,
    ))
}

fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// An OCI bundle for runc around `rootfs` (made with `runc spec`, command `true`).
fn runc_bundle(rootfs: &Path) -> Result<PathBuf> {
    let bundle = PathBuf::from("/run/brig-bench-runc");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(&bundle)?;
    let ok = Command::new("runc")
        .args(["spec"])
        .current_dir(&bundle)
        .status()?
        .success();
    if !ok {
        bail!("runc spec failed");
    }
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    spec["process"]["terminal"] = false.into();
    spec["process"]["args"] = serde_json::json!(["true"]);
    // Same root filesystem as Brig's run, writable as there.
    let root = std::fs::canonicalize(rootfs)?;
    spec["root"] = serde_json::json!({ "path": root, "readonly": false });
    std::fs::write(&path, serde_json::to_vec(&spec)?)?;
    Ok(bundle)
}

fn runc_run(runc: &Path, bundle: &Path, i: usize) -> Result<Duration> {
    let started = Instant::now();
    let status = Command::new(runc)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(format!("bench-runc-{i}"))
        .stdin(std::process::Stdio::null())
        .status()
        .context("running runc")?;
    let took = started.elapsed();
    if !status.success() {
        bail!("runc run failed: {status}");
    }
    Ok(took)
}

pub(crate) fn host_note() -> &'static str {
    if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd (in the lab: nested KVM under TCG, so absolute times are inflated; compare within this report only)"
    } else {
        "kvm"
    }
}

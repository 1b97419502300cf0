//! The pods benchmark (`make bench-pods`, report in bench/reports/pods.md): Brig pods against
//! runc pods through the same containerd and CRI, in one host session. Not a test: it is
//! `#[ignore]`d so that `make test` only builds it, and it asserts nothing about speed.
//!
//! Lines of the report are printed with the prefix `report: `.

use std::time::{Duration, Instant};

use brig_e2e::containerd::{Containerd, IMAGE};
use brig_e2e::cri::{container_config, pod_config, Cri};
use brig_e2e::processes_named;

const RUNS: usize = 10;
const AT_ONCE: usize = 10;

fn report(line: &str) {
    println!("report: {line}");
}

struct PodStart {
    /// RunPodSandbox (for Brig: the microVM boots in it).
    sandbox: Duration,
    /// CreateContainer + StartContainer of the workload.
    container: Duration,
    /// Brig only: VMM start → agent ready, from the shim's log.
    boot: Option<Duration>,
}

fn start_pod(cri: &Cri, handler: &str, name: &str, logs: &std::path::Path) -> (String, PodStart) {
    let mut config = pod_config(name, logs);
    // As kubelet for a host-network pod: runc cannot set a hostname in the host's UTS namespace.
    config.hostname.clear();
    let t0 = Instant::now();
    let pod = cri.run_pod(handler, &config);
    let sandbox = t0.elapsed();
    let t1 = Instant::now();
    cri.run_container(
        &pod,
        &config,
        container_config("app", IMAGE, &["sleep", "600"]),
    );
    let container = t1.elapsed();
    (
        pod,
        PodStart {
            sandbox,
            container,
            boot: None,
        },
    )
}

/// A `/proc/PID/…` field in kB (`Pss:` of smaps_rollup, `VmRSS:` of status).
fn kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `pid` and all its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let parent = all[i];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
                // pid (comm) state ppid …: comm may hold spaces, so split after ')'.
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
                if ppid == Some(parent) && !all.contains(&child) {
                    all.push(child);
                }
            }
        }
        i += 1;
    }
    all
}

/// The shim of the one running pod: (its RSS, PSS of it and everything it started), KiB.
fn pod_memory() -> (u64, u64) {
    let shims = processes_named("containerd-shim");
    assert_eq!(shims.len(), 1, "one pod at a time: {shims:?}");
    let rss = kib(shims[0], "status", "VmRSS:");
    let pss = tree(shims[0])
        .iter()
        .map(|&p| kib(p, "smaps_rollup", "Pss:"))
        .sum();
    (rss, pss)
}

/// `boot_time=…` of the shim's last "agent answered" line in containerd's log.
fn last_boot_time(log: &str) -> Option<Duration> {
    let line = log.lines().rev().find(|l| l.contains("agent answered"))?;
    let value = line.split("boot_time=").nth(1)?.split_whitespace().next()?;
    let value = value.trim_matches('"');
    if let Some(ms) = value.strip_suffix("ms") {
        return ms
            .parse::<f64>()
            .ok()
            .map(|v| Duration::from_secs_f64(v / 1000.0));
    }
    if let Some(us) = value.strip_suffix("µs") {
        return us
            .parse::<f64>()
            .ok()
            .map(|v| Duration::from_secs_f64(v / 1e6));
    }
    value
        .strip_suffix('s')?
        .parse::<f64>()
        .ok()
        .map(Duration::from_secs_f64)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[test]
#[ignore = "a benchmark: make bench-pods"]
fn bench_pods() {
    // The shim's debug line "agent answered … boot_time=…" splits Brig's pod start.
    std::env::set_var("BRIG_LOG", "brig_runtime::sandbox=debug");
    let c = Containerd::start_cri("bench-pods");
    c.import_busybox();
    let cri = Cri::connect(&c.socket);
    let logs = c.dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let mut starts: [Vec<PodStart>; 2] = [Vec::new(), Vec::new()];
    let mut memory: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    let handlers = ["runc", "sandboxed"];
    for run in 0..RUNS {
        // Interleaved, so that drift of the machine hits both alike.
        for (i, handler) in handlers.iter().enumerate() {
            let (pod, mut start) = start_pod(&cri, handler, &format!("{handler}-{run}"), &logs);
            if *handler == "sandboxed" {
                start.boot = last_boot_time(&c.log());
            }
            // Idle for a moment, as a pod is most of its life.
            std::thread::sleep(Duration::from_secs(2));
            memory[i].push(pod_memory());
            starts[i].push(start);
            cri.remove_pod(&pod);
        }
    }

    // Many pods at once: all become ready; the time against one pod's.
    let mut at_once = [Duration::ZERO; 2];
    for (i, handler) in handlers.iter().enumerate() {
        let t0 = Instant::now();
        let pods: Vec<String> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..AT_ONCE)
                .map(|n| {
                    let (cri, logs) = (&cri, &logs);
                    s.spawn(move || start_pod(cri, handler, &format!("many-{handler}-{n}"), logs).0)
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        at_once[i] = t0.elapsed();
        for pod in &pods {
            cri.remove_pod(pod);
        }
    }
    c.assert_clean();

    let whole = |s: &PodStart| s.sandbox + s.container;
    let runc_whole = median(starts[0].iter().map(whole).collect());
    let brig_whole = median(starts[1].iter().map(whole).collect());
    let boots: Vec<Duration> = starts[1].iter().filter_map(|s| s.boot).collect();
    let rest: Vec<Duration> = starts[1]
        .iter()
        .filter_map(|s| Some(whole(s).saturating_sub(s.boot?)))
        .collect();
    let median_kib = |v: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| {
        let mut x: Vec<u64> = v.iter().map(f).collect();
        x.sort();
        x[x.len() / 2]
    };
    // (libtest printed "test bench_pods ... " without a newline)
    println!();
    report("# Pods benchmark: Brig (handler sandboxed) vs runc through containerd's CRI");
    report("");
    report(&format!(
        "- {RUNS} pods each, interleaved, one host session, containerd {}; a pod = RunPodSandbox (host network) + CreateContainer + StartContainer of busybox `sleep`",
        c.ok(&["version"]).lines().find_map(|l| l.trim_start().strip_prefix("Version:")).unwrap_or("").trim()
    ));
    report("- in the lab (nested KVM under TCG, one vCPU) absolute times are inflated: compare within this report only");
    report("");
    report("| metric (median) | runc | brig |");
    report("|---|---:|---:|");
    report(&format!(
        "| RunPodSandbox | {} | {} |",
        ms(median(starts[0].iter().map(|s| s.sandbox).collect())),
        ms(median(starts[1].iter().map(|s| s.sandbox).collect()))
    ));
    report(&format!(
        "| CreateContainer + StartContainer | {} | {} |",
        ms(median(starts[0].iter().map(|s| s.container).collect())),
        ms(median(starts[1].iter().map(|s| s.container).collect()))
    ));
    report(&format!(
        "| whole pod start | {} | {} |",
        ms(runc_whole),
        ms(brig_whole)
    ));
    if !boots.is_empty() {
        let boot = median(boots);
        let rest = median(rest);
        report(&format!(
            "| … of which microVM boot (VMM start → agent ready) | – | {} |",
            ms(boot)
        ));
        report(&format!("| … the rest | – | {} |", ms(rest)));
        report(&format!(
            "| ratio brig rest / runc whole (goal ≤ 1) | – | {:.2} |",
            rest.as_secs_f64() / runc_whole.as_secs_f64()
        ));
    }
    report(&format!(
        "| host memory per idle pod (PSS of the shim and all it started; guest RAM touched included) | {} | {} |",
        mib(median_kib(&memory[0], |m| m.1)),
        mib(median_kib(&memory[1], |m| m.1))
    ));
    report(&format!(
        "| shim RSS (containerd-shim-runc-v2 / containerd-shim-brig-v2) | {} | {} |",
        mib(median_kib(&memory[0], |m| m.0)),
        mib(median_kib(&memory[1], |m| m.0))
    ));
    report(&format!(
        "| {AT_ONCE} pods started at once: all ready after | {} | {} |",
        ms(at_once[0]),
        ms(at_once[1])
    ));
    report(&format!(
        "| … against one pod (×) | {:.1} | {:.1} |",
        at_once[0].as_secs_f64() / runc_whole.as_secs_f64(),
        at_once[1].as_secs_f64() / brig_whole.as_secs_f64()
    ));
}

//! Memory a sandbox gives back (issue 7): with free page reporting, the memory a container's
//! spike made the guest touch returns to the host once the container frees it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use brig_e2e::{brig, busybox_rootfs, processes_named, scratch, text};

/// The largest resident set of the brig-vmm processes (the one holding guest memory), KiB.
fn vmm_rss_kib() -> u64 {
    processes_named("brig-vmm")
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// Resident set after it settles: the same value (within 1 MiB) twice, 2 s apart.
fn settled_rss_kib() -> u64 {
    let mut last = vmm_rss_kib();
    for _ in 0..15 {
        std::thread::sleep(Duration::from_secs(2));
        let now = vmm_rss_kib();
        if now.abs_diff(last) < 1024 {
            return now;
        }
        last = now;
    }
    last
}

#[test]
fn an_idle_sandbox_gives_back_the_memory_of_a_spike() {
    let t = "memory-spike";
    let dir = scratch(t);
    let rootfs = busybox_rootfs(&dir);
    let brig = |args: &[&str]| brig(t).args(args).stdin(Stdio::null()).output().unwrap();
    let run = brig(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "spiky",
        rootfs.to_str().unwrap(),
        "sleep",
        "600",
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let idle = settled_rss_kib();
    // 48 MiB written to the container's /dev/shm (guest memory), then freed.
    let spike = brig(&[
        "exec",
        "spiky",
        "sh",
        "-c",
        "head -c 48m /dev/zero > /dev/shm/spike && rm /dev/shm/spike",
    ]);
    let peak = vmm_rss_kib();
    // The guest reports free 2 MiB blocks after a few seconds; the host takes them back.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = peak;
    while Instant::now() < deadline {
        after = vmm_rss_kib();
        if after < idle + 16 * 1024 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = brig(&["rm", "-f", "spiky"]);
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));

    assert!(spike.status.success(), "{}", text(&spike.stderr));
    assert!(
        peak >= idle + 40 * 1024,
        "the spike did not show in the VMM's memory: idle {idle} KiB, peak {peak} KiB"
    );
    assert!(
        after < idle + 16 * 1024,
        "the freed spike stayed with the VMM: idle {idle} KiB, peak {peak} KiB, after {after} KiB"
    );
}

//! `brig run` on a host that cannot boot its guest kernel: it says why, and how to fix it, at
//! once (issue 8, item 6). Runs outside the lab: on a PVM host, or one without /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Far less than the boot timeout, far more than a check of /dev/kvm and one kernel file.
const AT_ONCE: Duration = Duration::from_secs(3);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("brig-preflight-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `path` if it is a file, else a stand-in for it written into `dir`.
fn file_or_stand_in(path: PathBuf, dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    if path.is_file() {
        return path;
    }
    let stand_in = dir.join(name);
    std::fs::write(&stand_in, content).unwrap();
    stand_in
}

#[test]
fn run_on_a_host_without_usable_kvm_fails_at_once_naming_the_problem_and_the_fix() {
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let kvm = Path::new("/dev/kvm").exists();
    let expected = match (kvm, pvm) {
        (true, true) => ["PVM", "PVM guest kernel"],
        (false, _) => ["no /dev/kvm", "hardware virtualization"],
        (true, false) => {
            eprintln!(
                "skipped: /dev/kvm here is real KVM, which boots the stock guest kernel \
                 (the e2e tests cover that)"
            );
            return;
        }
    };
    let dir = scratch("run");
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    // The stock guest kernel: the staged one if it was built, else a stand-in without PVM
    // guest code. Likewise the VMM and the initramfs, which must never be reached.
    let brig = PathBuf::from(env!("CARGO_BIN_EXE_brig"));
    let target = brig.parent().unwrap().parent().unwrap();
    let staged = target.join("brig/share/brig");
    let kernel = file_or_stand_in(
        staged.join("vmlinux"),
        &dir,
        "vmlinux",
        b"\x7fELF a stock kernel stand-in",
    );
    let initrd = file_or_stand_in(staged.join("initramfs.cpio.gz"), &dir, "initrd", b"");
    let vmm = file_or_stand_in(brig.with_file_name("brig-vmm"), &dir, "brig-vmm", b"");
    let config = dir.join("brig.toml");
    std::fs::write(&config, "").unwrap();
    let root = dir.join("root");

    let started = Instant::now();
    let out = Command::new(&brig)
        .arg("run")
        .arg(&rootfs)
        .arg("true")
        .env("BRIG_CONFIG", &config)
        .env("BRIG_ROOT", &root)
        .env("BRIG_KERNEL", &kernel)
        .env("BRIG_INITRD", &initrd)
        .env("BRIG_VMM", &vmm)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(took < AT_ONCE, "took {took:?}: {stderr}");
    for needed in expected {
        assert!(stderr.contains(needed), "{needed:?} not named: {stderr}");
    }
    if pvm {
        for fix in [
            "kernel =",
            "brig.toml",
            "hardware virtualization",
            "tests/lab/run.sh",
        ] {
            assert!(stderr.contains(fix), "the fix {fix:?} not named: {stderr}");
        }
    }
    assert_eq!(stderr.trim().lines().count(), 1, "one message: {stderr}");
    // Nothing was left behind: no sandbox, no container record.
    for kind in ["sandboxes", "containers"] {
        let left: Vec<_> = std::fs::read_dir(root.join(kind))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{kind} left behind: {left:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

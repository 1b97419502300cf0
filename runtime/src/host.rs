//! What this host can do for Brig: the facts `brig check` reports, and the same check made
//! before every boot ([`preflight`]), so that a host that cannot run the guest kernel says so
//! at once instead of after a boot timeout.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The kind of KVM this host offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization (`kvm_intel` or `kvm_amd`): stock guest kernels boot.
    Hardware(&'static str),
    /// PVM (`kvm_pvm`): only PVM-enlightened guest kernels (CONFIG_PVM_GUEST) boot.
    Pvm,
    /// `/dev/kvm` exists but no known KVM module is loaded (built-in KVM): assume hardware.
    Unknown,
    /// No `/dev/kvm`.
    None,
}

/// One fact about the host, for people to read.
#[derive(Debug, Clone)]
pub struct Fact {
    /// Short name.
    pub name: &'static str,
    /// Whether it is in order.
    pub ok: bool,
    /// What was found and, if not ok, what to do.
    pub detail: String,
}

/// Everything `brig check` looks at.
#[derive(Debug, Clone)]
pub struct HostReport {
    /// The KVM flavour.
    pub kvm: KvmKind,
    /// The facts, in display order.
    pub facts: Vec<Fact>,
}

impl HostReport {
    /// Whether Brig can boot its stock guest kernel directly on this host.
    pub fn can_boot_guests(&self) -> bool {
        matches!(self.kvm, KvmKind::Hardware(_) | KvmKind::Unknown)
            && self
                .facts
                .iter()
                .all(|f| f.ok || !f.name.starts_with("kvm"))
    }
}

/// Detect the KVM flavour from `/sys/module` and `/dev`.
pub fn kvm_kind(root: &Path) -> KvmKind {
    let module = |m: &str| root.join("sys/module").join(m).exists();
    if !root.join("dev/kvm").exists() {
        KvmKind::None
    } else if module("kvm_pvm") {
        KvmKind::Pvm
    } else if module("kvm_intel") {
        KvmKind::Hardware("kvm_intel")
    } else if module("kvm_amd") {
        KvmKind::Hardware("kvm_amd")
    } else {
        KvmKind::Unknown
    }
}

/// What to do on a PVM host, said the same way by [`preflight`] and by boot errors.
pub const PVM_FIX: &str = "point `kernel =` in brig.toml (or BRIG_KERNEL) at a PVM guest kernel \
     (CONFIG_PVM_GUEST=y), use a host with hardware virtualization (kvm_intel or kvm_amd), or \
     run Brig inside the project's nested-KVM lab (tests/lab/run.sh); if the kernel is a PVM \
     guest kernel that Brig fails to recognise, set `pvm_guest_kernel = true` in brig.toml";

/// Why this host cannot boot the configured guest kernel (found before the VMM starts).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// PVM runs only PVM-enlightened guests; a stock kernel would hang and then crash.
    #[error(
        "cannot boot a microVM on this host: /dev/kvm is PVM (kvm_pvm), which runs only PVM guest \
         kernels, and the guest kernel {} is a stock one (it has no PVM guest support); {PVM_FIX}",
        kernel.display()
    )]
    PvmStockKernel { kernel: PathBuf },
    /// No KVM at all.
    #[error(
        "cannot boot a microVM on this host: there is no /dev/kvm (KVM is not available); enable \
         virtualization in the firmware and load kvm_intel or kvm_amd, use a host with hardware \
         virtualization, or run Brig inside a VM with nested virtualization (the project's lab: \
         tests/lab/run.sh)"
    )]
    NoKvm,
    /// `/dev/kvm` exists but this process may not use it.
    #[error(
        "cannot boot a microVM on this host: /dev/kvm cannot be opened read-write ({source}); run \
         as root or join the kvm group"
    )]
    KvmAccess { source: std::io::Error },
}

/// Check, before a boot, what `brig check` checks about KVM on the host rooted at `root`:
/// that `/dev/kvm` exists and opens read-write, and, on a PVM host, that `kernel` is a PVM
/// guest kernel (unless `pvm_guest_kernel` says so already: the user's word for a kernel whose
/// PVM support [`is_pvm_guest_kernel`] cannot see, e.g. a stripped one with a quiet boot).
/// Takes milliseconds. A kernel that cannot be read is left for the VMM to name.
pub fn preflight(root: &Path, kernel: &Path, pvm_guest_kernel: bool) -> Result<KvmKind, HostError> {
    let kvm = kvm_kind(root);
    match kvm {
        KvmKind::None => return Err(HostError::NoKvm),
        KvmKind::Pvm if !pvm_guest_kernel && !is_pvm_guest_kernel(kernel).unwrap_or(true) => {
            return Err(HostError::PvmStockKernel {
                kernel: kernel.to_path_buf(),
            })
        }
        _ => {}
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("dev/kvm"))
        .map_err(|source| HostError::KvmAccess { source })?;
    Ok(kvm)
}

/// Byte strings only a kernel built with `CONFIG_PVM_GUEST=y` holds: the symbol of its early
/// PVM setup (in the symbol table of an unstripped `vmlinux`) and the prefix of the PVM guest
/// code's kernel messages.
const PVM_GUEST_MARKERS: [&[u8]; 2] = [b"pvm_early_setup", b"pvm-guest: "];

/// Whether the kernel image at `path` has PVM guest support (see [`PVM_GUEST_MARKERS`]).
/// Reads the file once, in chunks, without holding it in memory.
pub fn is_pvm_guest_kernel(path: &Path) -> std::io::Result<bool> {
    let mut file = std::fs::File::open(path)?;
    let overlap = PVM_GUEST_MARKERS.iter().map(|m| m.len()).max().unwrap_or(0) - 1;
    let mut buf = vec![0u8; 1 << 20];
    // `kept` bytes of the previous chunk's end sit at the front, so that a marker split
    // between two reads is still found.
    let mut kept = 0;
    loop {
        let n = file.read(&mut buf[kept..])?;
        if n == 0 {
            return Ok(false);
        }
        let window = &buf[..kept + n];
        if holds_a_marker(window) {
            return Ok(true);
        }
        kept = overlap.min(window.len());
        let from = window.len() - kept;
        buf.copy_within(from..from + kept, 0);
    }
}

/// Whether `bytes` holds one of [`PVM_GUEST_MARKERS`] (which all begin with `pvm`): only
/// the places of a `p` are compared, which keeps a 20 MB kernel's scan short even unoptimized.
fn holds_a_marker(bytes: &[u8]) -> bool {
    let mut at = 0;
    while let Some(i) = bytes[at..].iter().position(|b| *b == b'p') {
        let rest = &bytes[at + i..];
        if PVM_GUEST_MARKERS.iter().any(|m| rest.starts_with(m)) {
            return true;
        }
        at += i + 1;
    }
    false
}

/// An explanation for a VMM that stopped (during boot or later), from its own last words: a KVM
/// internal error is what a stock kernel on PVM ends in, and what KVM reports for a guest it
/// cannot run. `None` when the words say nothing of the kind.
pub fn explain_vmm_failure(kvm: &KvmKind, vmm_says: &str) -> Option<String> {
    if !vmm_says.contains("KVM internal error") {
        return None;
    }
    Some(match kvm {
        KvmKind::Pvm => format!(
            "KVM could not run the guest kernel: /dev/kvm on this host is PVM (kvm_pvm), which \
             runs only PVM guest kernels; {PVM_FIX}"
        ),
        _ => format!(
            "KVM could not run the guest kernel (a KVM internal error): check that the kernel is \
             built for this host's KVM (`brig check`); on a PVM host, {PVM_FIX}"
        ),
    })
}

/// Look at the host rooted at `root` (`/` in production).
pub fn inspect(root: &Path) -> HostReport {
    let kvm = kvm_kind(root);
    let mut facts = Vec::new();
    let (ok, detail) = match &kvm {
        KvmKind::Hardware(m) => (true, format!("hardware virtualization ({m}): stock guest kernels boot")),
        KvmKind::Unknown => (true, "/dev/kvm present (KVM built into the kernel)".to_string()),
        KvmKind::Pvm => (
            false,
            "/dev/kvm is PVM (kvm_pvm): it boots only PVM guest kernels (CONFIG_PVM_GUEST=y), not Brig's \
             stock guest kernel. Build a PVM guest kernel and point Brig at it with `kernel = \"/path/vmlinux\"` \
             in /etc/brig/brig.toml or BRIG_KERNEL=/path/vmlinux; or run Brig inside a VM with nested \
             hardware virtualization (the project's lab: tests/lab/run.sh)"
                .to_string(),
        ),
        KvmKind::None => (
            false,
            "no /dev/kvm: enable virtualization in firmware and load kvm_intel or kvm_amd (modprobe kvm_intel), \
             or run on a VM with nested virtualization"
                .to_string(),
        ),
    };
    facts.push(Fact {
        name: "kvm",
        ok,
        detail,
    });
    if kvm != KvmKind::None {
        let dev = root.join("dev/kvm");
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .is_ok();
        facts.push(Fact {
            name: "kvm-access",
            ok: usable,
            detail: if usable {
                "/dev/kvm can be opened read-write".into()
            } else {
                "/dev/kvm cannot be opened read-write: run as root or join the kvm group".into()
            },
        });
    }
    let tun = root.join("dev/net/tun").exists();
    facts.push(Fact {
        name: "tun",
        ok: tun,
        detail: if tun {
            "/dev/net/tun present (pod networking through TAP devices)".into()
        } else {
            "/dev/net/tun missing: modprobe tun (needed for pod networking)".into()
        },
    });
    // tc's ingress qdisc, u32 classifier and mirred action move frames between a pod's
    // interface and its TAP: tried for real on this host's kernel.
    let tc = if root == Path::new("/") {
        crate::net::probe_tc()
    } else {
        Err("not tried (not the running host)".into())
    };
    facts.push(Fact {
        name: "tc",
        ok: tc.is_ok(),
        detail: match tc {
            Ok(()) => "tc ingress qdisc, u32 filter and mirred redirect work (a pod's interface is wired to its TAP)".into(),
            Err(e) => format!("{e}: pods with a network cannot be wired to their microVM (load sch_ingress, cls_u32 and act_mirred)"),
        },
    });
    let cni = ["bridge", "host-local", "portmap"]
        .into_iter()
        .filter(|p| !root.join("usr/lib/cni").join(p).exists())
        .collect::<Vec<_>>();
    facts.push(Fact {
        name: "cni",
        ok: true,
        detail: if cni.is_empty() {
            "CNI plugins bridge, host-local and portmap in /usr/lib/cni (brig run --network bridge)".into()
        } else {
            format!("CNI plugins {} missing from /usr/lib/cni: `brig run` needs --network none (or apt-get install containernetworking-plugins); pods get their network from the cluster's CNI", cni.join(", "))
        },
    });
    let vhost = root.join("dev/vhost-vsock").exists();
    facts.push(Fact {
        name: "vsock",
        ok: true,
        detail: if vhost {
            "vsock is served inside brig-vmm (hybrid vsock over a Unix socket); /dev/vhost-vsock is present but not needed".into()
        } else {
            "vsock is served inside brig-vmm (hybrid vsock over a Unix socket); no vhost_vsock needed".into()
        },
    });
    let cgroup2 = root.join("sys/fs/cgroup/cgroup.controllers").exists();
    facts.push(Fact {
        name: "cgroup",
        ok: cgroup2,
        detail: if cgroup2 {
            let controllers = std::fs::read_to_string(root.join("sys/fs/cgroup/cgroup.controllers")).unwrap_or_default();
            format!("cgroup v2 unified hierarchy (controllers: {})", controllers.trim())
        } else {
            "no cgroup v2 unified hierarchy at /sys/fs/cgroup: sandboxes cannot be accounted on the host".into()
        },
    });
    HostReport { kvm, facts }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(files: &[&str]) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "brig-host-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, "").unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    #[test]
    fn pvm_is_told_apart_from_hardware() {
        let pvm = fake_host(&["dev/kvm", "sys/module/kvm_pvm/x", "sys/module/kvm/x"]);
        let report = inspect(&pvm);
        assert_eq!(report.kvm, KvmKind::Pvm);
        assert!(!report.can_boot_guests());
        assert!(report.facts[0].detail.contains("BRIG_KERNEL"));

        let amd = fake_host(&["dev/kvm", "sys/module/kvm_amd/x"]);
        assert_eq!(kvm_kind(&amd), KvmKind::Hardware("kvm_amd"));

        let none = fake_host(&["sys/module/kvm/x"]);
        assert_eq!(kvm_kind(&none), KvmKind::None);
        assert!(!inspect(&none).can_boot_guests());
        for d in [pvm, amd, none] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    /// A kernel image of `len` bytes with `marker` at `at`.
    fn kernel_with(root: &Path, marker: &[u8], at: usize, len: usize) -> PathBuf {
        let mut image = vec![b'p'; len];
        image[at..at + marker.len()].copy_from_slice(marker);
        let path = root.join("vmlinux");
        std::fs::write(&path, image).unwrap();
        path
    }

    #[test]
    fn a_pvm_host_refuses_a_stock_kernel_at_once_and_names_the_fix() {
        let pvm = fake_host(&["dev/kvm", "sys/module/kvm_pvm/x"]);
        let stock = kernel_with(&pvm, b"stock", 0, 3 << 20);
        let err = preflight(&pvm, &stock, false).unwrap_err();
        assert!(matches!(err, HostError::PvmStockKernel { .. }), "{err}");
        let msg = err.to_string();
        for needed in [
            "PVM",
            "kernel =",
            "brig.toml",
            "hardware virtualization",
            "tests/lab/run.sh",
            "pvm_guest_kernel = true",
        ] {
            assert!(msg.contains(needed), "{needed:?} missing: {msg}");
        }
        // The user's word overrides what the markers say.
        assert_eq!(preflight(&pvm, &stock, true).unwrap(), KvmKind::Pvm);
        std::fs::remove_dir_all(pvm).unwrap();
    }

    #[test]
    fn a_pvm_guest_kernel_passes_wherever_its_marker_sits() {
        let pvm = fake_host(&["dev/kvm", "sys/module/kvm_pvm/x"]);
        // Across the boundary of the 1 MiB reads, and at the very end.
        for at in [0, (1 << 20) - 5, (3 << 20) - 15] {
            let kernel = kernel_with(&pvm, b"pvm_early_setup", at, 3 << 20);
            assert!(is_pvm_guest_kernel(&kernel).unwrap(), "marker at {at}");
            assert_eq!(preflight(&pvm, &kernel, false).unwrap(), KvmKind::Pvm);
        }
        let kernel = kernel_with(&pvm, b"\x016pvm-guest: ", 12345, 1 << 16);
        assert!(is_pvm_guest_kernel(&kernel).unwrap());
        // A kernel that cannot be read is the VMM's to name (with the path it was given).
        assert!(preflight(&pvm, &pvm.join("missing"), false).is_ok());
        std::fs::remove_dir_all(pvm).unwrap();
    }

    #[test]
    fn no_kvm_is_refused_and_hardware_kvm_boots_any_kernel() {
        let none = fake_host(&["sys/module/kvm/x"]);
        let stock = kernel_with(&none, b"stock", 0, 4096);
        let msg = preflight(&none, &stock, false).unwrap_err().to_string();
        assert!(
            msg.contains("no /dev/kvm") && msg.contains("tests/lab/run.sh"),
            "{msg}"
        );
        let amd = fake_host(&["dev/kvm", "sys/module/kvm_amd/x"]);
        assert_eq!(
            preflight(&amd, &stock, false).unwrap(),
            KvmKind::Hardware("kvm_amd")
        );
        for d in [none, amd] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn a_kvm_internal_error_is_explained() {
        let says = "brig-vmm: guest crashed: vCPU 0: KVM internal error";
        let on_pvm = explain_vmm_failure(&KvmKind::Pvm, says).unwrap();
        assert!(
            on_pvm.contains("PVM") && on_pvm.contains("kernel ="),
            "{on_pvm}"
        );
        let elsewhere = explain_vmm_failure(&KvmKind::Hardware("kvm_intel"), says).unwrap();
        assert!(elsewhere.contains("brig check"), "{elsewhere}");
        assert_eq!(
            explain_vmm_failure(&KvmKind::Pvm, "brig-vmm: guest kernel panicked"),
            None
        );
    }
}

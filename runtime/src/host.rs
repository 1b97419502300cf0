//! What this host can do for Brig: the facts `brig check` reports.

use std::path::Path;

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
}

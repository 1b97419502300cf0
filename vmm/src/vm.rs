//! Assemble a microVM from a [`VmConfig`] and run it until the guest resets, crashes, or the
//! VMM is told to stop.
//!
//! Threads: one per vCPU (port and MMIO exits are served right there), one event loop per
//! virtio device (its queues and backend), one that waits for SIGTERM/SIGINT. The thread
//! that called [`run`] waits for the first of them to report how the VM ended.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout::*;
use crate::arch::{cpu, mptable, pvh};
use crate::config::{ConsoleTarget, NetBackend, VmConfig};
use crate::devices::legacy::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::legacy::{
    ConsoleOutput, PanicWatch, SerialConsole, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_RESET,
};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{IrqTrigger, VirtioDevice};
use crate::seccomp::{self, SeccompError, SeccompMode, ThreadKind};
use seccompiler::BpfProgram;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset or powered off: the normal end of a microVM.
    GuestReset,
    /// The guest kernel panicked (the line is from its console).
    GuestPanic(String),
    /// The guest crashed in a way KVM reported (triple fault, failed entry…).
    GuestCrash(String),
    /// The VMM received a termination signal.
    Signal(i32),
    /// The VMM itself failed while the VM ran (e.g. a thread could not filter its calls).
    VmmFailure(String),
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// /dev/kvm is missing or unusable.
    #[error(
        "cannot use /dev/kvm: {0} (is KVM available? `brig check` tells what this host can do)"
    )]
    Kvm(kvm_ioctls::Error),
    /// A KVM VM-level ioctl failed.
    #[error("{what} failed: {source}")]
    KvmOp {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory { mib: u64, reason: String },
    /// Loading the kernel, initrd or boot data failed.
    #[error(transparent)]
    Boot(#[from] pvh::BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// A vCPU could not be configured.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// The vsock device could not be created.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// The virtio-fs device could not be created.
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    /// The virtio-net device could not be created.
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// The VMM could not move into its own mount namespace.
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
    /// Capabilities could not be dropped.
    #[error(transparent)]
    Privileges(#[from] crate::privileges::PrivilegeError),
    /// Some other OS resource (eventfd, thread, signal mask) failed.
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Os { what, source }
}

fn kvm_op(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmOp { what, source }
}

/// The devices vCPU threads dispatch port and MMIO accesses to.
struct Bus {
    serial: Mutex<SerialConsole>,
    mmio: Vec<(u64, Mutex<MmioTransport>)>,
}

impl Bus {
    fn mmio(&self, addr: u64) -> Option<(u64, &Mutex<MmioTransport>)> {
        self.mmio
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_SIZE).contains(&addr))
            .map(|(base, t)| (addr - base, t))
    }
}

/// Build the VM described by `config` and run it. Returns when the VM has ended; vCPU
/// threads may still be parked in KVM, so the caller should exit the process soon.
pub fn run(config: &VmConfig) -> Result<VmExit, VmError> {
    config.validate()?;
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = kvm.create_vm().map_err(kvm_op("KVM_CREATE_VM"))?;
    let mem = create_memory(&vm, config.mem_mib)?;
    advise_huge_pages(&mem, config.thp).map_err(|e| VmError::Memory {
        mib: config.mem_mib,
        reason: format!("madvise: {e}"),
    })?;

    vm.set_tss_address(usize::try_from(KVM_TSS_ADDR).unwrap_or(usize::MAX))
        .map_err(kvm_op("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(kvm_op("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_op("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_op("KVM_CREATE_PIT2"))?;

    // Console sink first: files the VMM creates must exist before the virtio-fs server
    // clears the process umask.
    let panic_watch = PanicWatch::default();
    let sink: Option<Box<dyn Write + Send>> = match &config.console {
        ConsoleTarget::Stdout => Some(Box::new(std::io::stdout())),
        ConsoleTarget::File { path, limit } => {
            let bad = |e: std::io::Error| {
                VmError::Config(crate::config::ConfigError::ConsoleFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            };
            // Not O_APPEND: the capped file writes at its own offsets (pwrite), and moves
            // the newest part to the front when it would pass the cap.
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(false)
                .open(path)
                .map_err(bad)?;
            Some(Box::new(
                crate::console_file::CappedFile::new(file, *limit).map_err(bad)?,
            ))
        }
        ConsoleTarget::Off => None,
    };
    // Devices. Each virtio-mmio device gets a window, an IRQ, an irqfd and ioeventfds.
    let (exit_tx, exit_rx) = mpsc::channel::<VmExit>();
    let mut cmdline = config.cmdline.trim().to_string();
    // Each device has its own event loop thread: a slow file operation of the virtio-fs
    // server never holds up the agent's vsock traffic, and each thread's seccomp filter
    // allows only its own device's system calls.
    let mut loops: Vec<(ThreadKind, EventLoop)> = Vec::new();
    let mut mmio = Vec::new();
    let mut vsock_dev = None;
    let mut fs_dev = None;
    if let Some(vsock_cfg) = &config.vsock {
        let vsock = Arc::new(Mutex::new(Vsock::new(
            vsock_cfg.guest_cid,
            vsock_cfg.uds.clone(),
        )?));
        let transport = attach_mmio_device(&vm, &mem, vsock.clone(), mmio.len(), &mut cmdline)?;
        let mut events = new_event_loop()?;
        events.add_subscriber(vsock.clone());
        loops.push((ThreadKind::Vsock, events));
        mmio.push(transport);
        vsock_dev = Some(vsock);
    }
    if let Some(fs_cfg) = &config.fs {
        raise_open_file_limit();
        let fs = Arc::new(Mutex::new(Fs::with_cache(
            &fs_cfg.tag,
            fs_cfg.shared_dir.clone(),
            fs_cfg.cache,
        )?));
        let transport = attach_mmio_device(&vm, &mem, fs.clone(), mmio.len(), &mut cmdline)?;
        let mut events = new_event_loop()?;
        events.add_subscriber(fs.clone());
        loops.push((ThreadKind::Fs, events));
        mmio.push(transport);
        fs_dev = Some(fs);
    }
    if let Some(net_cfg) = &config.net {
        // Opened (or taken) here, before confinement hides /dev and capabilities are dropped.
        let tap = match &net_cfg.backend {
            NetBackend::Tap(name) => Tap::open(name),
            NetBackend::Fd(fd) => {
                // SAFETY: the parent passed descriptor `fd` for this device, `validate`
                // checked that it is an open TAP, and nothing else in the VMM owns it.
                Tap::from_fd(unsafe { OwnedFd::from_raw_fd(*fd) })
            }
        }
        .map_err(crate::devices::virtio::net::NetError::from)?;
        let mut device = Net::new(tap, net_cfg.mac, net_cfg.mtu)?;
        device.set_offload(net_cfg.offload);
        let net = Arc::new(Mutex::new(device));
        let transport = attach_mmio_device(&vm, &mem, net.clone(), mmio.len(), &mut cmdline)?;
        let mut events = new_event_loop()?;
        events.add_subscriber(net);
        loops.push((ThreadKind::Net, events));
        mmio.push(transport);
    }
    if config.free_page_reporting {
        let balloon = Arc::new(Mutex::new(
            Balloon::new().map_err(os("creating the balloon"))?,
        ));
        let transport = attach_mmio_device(&vm, &mem, balloon.clone(), mmio.len(), &mut cmdline)?;
        let mut events = new_event_loop()?;
        events.add_subscriber(balloon);
        loops.push((ThreadKind::Balloon, events));
        mmio.push(transport);
    }
    if !mmio.is_empty() {
        cmdline.push_str(MMIO_VRING_IRQ_ONLY);
    }

    // Boot data.
    let entry = pvh::load_kernel(&mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(pvh::load_initrd(&mem, path, entry.kernel_end)?),
        None => None,
    };
    pvh::write_cmdline(&mem, &cmdline)?;
    pvh::write_start_info(&mem, initrd)?;
    mptable::write(&mem, config.vcpus)?;
    cpu::write_descriptor_tables(&mem)?;

    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(os("creating the serial eventfd"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_op("KVM_IRQFD (serial)"))?;
    let serial = SerialConsole::new(serial_irq, ConsoleOutput::new(sink, panic_watch.clone()));
    let bus = Arc::new(Bus {
        serial: Mutex::new(serial),
        mmio,
    });

    // vCPUs.
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_op("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(config.vcpus.into());
    for id in 0..config.vcpus {
        let vcpu = vm
            .create_vcpu(id.into())
            .map_err(kvm_op("KVM_CREATE_VCPU"))?;
        cpu::configure(
            &vcpu,
            id,
            config.vcpus,
            entry.pvh_entry.0,
            &base_cpuid,
            tsc_deadline,
        )?;
        vcpus.push(vcpu);
    }

    // Each thread filters its own system calls from its start; the programs are built (and
    // can fail) before any thread runs.
    let filters = ThreadFilters::build(config.seccomp)?;
    // Nor do they see the host's files: the sandbox directory becomes our root, and the
    // devices find their paths in it.
    if let (true, Some(root)) = (config.confine, config.confinement_root()) {
        confine_devices(&root, vsock_dev.as_ref(), fs_dev.as_ref())?;
    }
    // Nor do they need root's capabilities: only the virtio-fs server's few stay.
    crate::privileges::drop_unneeded(config.fs.is_some())?;

    // From here on the VM runs. Termination signals are taken by one thread only.
    let signals = termination_signals();
    signals.thread_block().map_err(|e| VmError::Os {
        what: "blocking signals",
        source: e.into(),
    })?;
    spawn_filtered(
        "signals".into(),
        filters.get(ThreadKind::Signals),
        &exit_tx,
        move || signals.wait().ok().map(|sig| VmExit::Signal(sig as i32)),
    )?;
    for (kind, mut events) in loops {
        spawn_filtered(kind.name().into(), filters.get(kind), &exit_tx, move || {
            loop {
                if let Err(e) = events.run() {
                    tracing::error!("{kind:?} event loop: {e}");
                    return None;
                }
            }
        })?;
    }
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let bus = bus.clone();
        spawn_filtered(
            format!("vcpu{id}"),
            filters.get(ThreadKind::Vcpu),
            &exit_tx,
            move || Some(run_vcpu(id, vcpu, &bus)),
        )?;
    }
    drop(exit_tx);
    filters.get(ThreadKind::Main).install()?;

    let exit = exit_rx
        .recv()
        .unwrap_or_else(|_| VmExit::GuestCrash("every vCPU thread ended".into()));
    if let Ok(mut serial) = bus.serial.lock() {
        serial.flush();
    }
    // A reset right after a kernel panic is the panic, not a clean reboot.
    Ok(match (exit, panic_watch.panic_line()) {
        (VmExit::GuestReset, Some(line)) => VmExit::GuestPanic(line),
        (exit, _) => exit,
    })
}

/// One thread's seccomp program (None when filters are off), shared by threads of a kind.
#[derive(Clone)]
struct ThreadFilter {
    kind: ThreadKind,
    program: Option<Arc<BpfProgram>>,
}

impl ThreadFilter {
    fn install(&self) -> Result<(), SeccompError> {
        match &self.program {
            Some(program) => seccomp::install(self.kind, program),
            None => Ok(()),
        }
    }
}

struct ThreadFilters {
    vcpu: ThreadFilter,
    vsock: ThreadFilter,
    fs: ThreadFilter,
    net: ThreadFilter,
    balloon: ThreadFilter,
    signals: ThreadFilter,
    main: ThreadFilter,
}

impl ThreadFilters {
    fn build(mode: SeccompMode) -> Result<Self, SeccompError> {
        if mode == SeccompMode::Enforce {
            seccomp::install_sigsys_handler()?;
        }
        let one = |kind| -> Result<ThreadFilter, SeccompError> {
            let program = match mode {
                SeccompMode::Off => None,
                mode => Some(Arc::new(seccomp::program(kind, mode)?)),
            };
            Ok(ThreadFilter { kind, program })
        };
        Ok(Self {
            vcpu: one(ThreadKind::Vcpu)?,
            vsock: one(ThreadKind::Vsock)?,
            fs: one(ThreadKind::Fs)?,
            net: one(ThreadKind::Net)?,
            balloon: one(ThreadKind::Balloon)?,
            signals: one(ThreadKind::Signals)?,
            main: one(ThreadKind::Main)?,
        })
    }

    fn get(&self, kind: ThreadKind) -> ThreadFilter {
        match kind {
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Vsock => &self.vsock,
            ThreadKind::Fs => &self.fs,
            ThreadKind::Net => &self.net,
            ThreadKind::Balloon => &self.balloon,
            ThreadKind::Signals => &self.signals,
            // The supervisor is another process (pid_ns.rs), filtered there; it never asks.
            ThreadKind::Main | ThreadKind::Supervisor => &self.main,
        }
        .clone()
    }
}

/// Start thread `name`: it installs `filter`, runs `body`, and reports how the VM ended, if
/// `body` says, on `exit` (a filter it cannot install ends the VM too).
fn spawn_filtered(
    name: String,
    filter: ThreadFilter,
    exit: &mpsc::Sender<VmExit>,
    body: impl FnOnce() -> Option<VmExit> + Send + 'static,
) -> Result<(), VmError> {
    let tx = exit.clone();
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            let ended = match filter.install() {
                Ok(()) => body(),
                Err(e) => Some(VmExit::VmmFailure(e.to_string())),
            };
            if let Some(ended) = ended {
                let _ = tx.send(ended);
            }
        })
        .map_err(os("spawning a VMM thread"))?;
    Ok(())
}

/// Enter the VMM's own root (see `crate::confine`) and tell the devices where their paths
/// are seen from there.
fn confine_devices(
    root: &Path,
    vsock: Option<&Arc<Mutex<Vsock>>>,
    fs: Option<&Arc<Mutex<Fs>>>,
) -> Result<(), VmError> {
    // Resolved before entering: host paths do not resolve afterwards.
    let uds = vsock
        .map(|v| crate::confine::canonical(v.lock().unwrap_or_else(|p| p.into_inner()).uds_path()));
    crate::confine::enter(root)?;
    let moved = |what: &Path| {
        crate::confine::visible(what).ok_or_else(|| {
            VmError::Config(crate::config::ConfigError::OutsideRoot(
                what.to_path_buf(),
                root.to_path_buf(),
            ))
        })
    };
    if let (Some(vsock), Some(uds)) = (vsock, uds) {
        vsock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rebase(moved(&uds)?);
    }
    if let Some(fs) = fs {
        let mut fs = fs.lock().unwrap_or_else(|p| p.into_inner());
        let dir = moved(fs.shared_dir())?;
        fs.rebase(dir)?;
    }
    Ok(())
}

type EventLoop = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

fn new_event_loop() -> Result<EventLoop, VmError> {
    EventManager::new().map_err(|e| VmError::Os {
        what: "creating an event loop",
        source: std::io::Error::other(e.to_string()),
    })
}

fn termination_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set
}

fn create_memory(vm: &VmFd, mib: u64) -> Result<GuestMemoryMmap, VmError> {
    let size = mib
        .checked_mul(1 << 20)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| VmError::Memory {
            mib,
            reason: "more memory than this host can address".into(),
        })?;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| VmError::Memory {
            mib,
            reason: e.to_string(),
        })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Memory {
                mib,
                reason: e.to_string(),
            })?;
        let region_info = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| VmError::Memory {
                mib,
                reason: "too many memory regions".into(),
            })?,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem` of exactly `memory_size`
        // bytes; `mem` is kept alive (cloned into devices and boot code) for as long as the
        // VM runs, and the process exits when the VM ends.
        unsafe { vm.set_user_memory_region(region_info) }
            .map_err(kvm_op("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(mem)
}

/// Back guest memory with transparent huge pages (`thp`) or never with them.
///
/// Where THP is `always` (Debian's default), a guest that touches one byte of a 2 MiB range
/// costs the host all 2 MiB: an idle 256 MiB guest using 20 MiB had 40 MiB of huge pages
/// behind it. Sandboxes are many and mostly idle, so density wins by default; `thp` trades
/// that memory for fewer TLB misses (the `--thp` flag, `guest_thp` in brig.toml).
fn advise_huge_pages(mem: &GuestMemoryMmap, thp: bool) -> std::io::Result<()> {
    let advice = if thp {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(std::io::Error::other)?;
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        // SAFETY: `host..host+len` is exactly one live anonymous mapping owned by `mem`;
        // MADV_HUGEPAGE/NOHUGEPAGE change only how the kernel backs it, never its contents.
        if unsafe { libc::madvise(host.cast(), len, advice) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Tells Brig's guest kernel (guest-kernel/virtio-mmio-vring-irq-only.patch; other kernels
/// ignore it) that it need not read `InterruptStatus` nor write `InterruptACK` on a virtio-mmio
/// interrupt, two exits to this VMM per interrupt: every device here interrupts for used
/// buffers, each on an edge-triggered line (an irqfd) of its own, so the driver looks at all
/// of the device's queues, as it would with MSI. The one other interrupt, the configuration
/// change that follows a failed activation (`DEVICE_NEEDS_RESET`), is one Linux 6.1 does not
/// act on. In the lab this took a third of the VM exits of a pod's TCP send and 30 % more
/// throughput.
const MMIO_VRING_IRQ_ONLY: &str = " virtio_mmio.vring_irq_only=1";

/// Give `device` the `index`-th virtio-mmio window and IRQ: irqfd, ioeventfds, transport,
/// and its declaration on the kernel command line.
fn attach_mmio_device<D: VirtioDevice + 'static>(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    device: Arc<Mutex<D>>,
    index: usize,
    cmdline: &mut String,
) -> Result<(u64, Mutex<MmioTransport>), VmError> {
    let base = MMIO_BASE + MMIO_SIZE * index as u64;
    let irq = u32::try_from(index).map_or(u32::MAX, |i| MMIO_IRQ_BASE.saturating_add(i));
    if irq > IRQ_MAX {
        return Err(VmError::Os {
            what: "attaching a virtio-mmio device",
            source: std::io::Error::other("out of IRQs"),
        });
    }
    let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(os("creating a device IRQ eventfd"))?;
    vm.register_irqfd(&irq_evt, irq)
        .map_err(kvm_op("KVM_IRQFD (virtio-mmio)"))?;
    {
        let dev = device.lock().unwrap_or_else(|p| p.into_inner());
        for (i, evt) in dev.queue_events().iter().enumerate() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                u32::try_from(i).map_err(|_| VmError::Os {
                    what: "attaching a virtio-mmio device",
                    source: std::io::Error::other("too many queues"),
                })?,
            )
            .map_err(kvm_op("KVM_IOEVENTFD (virtio-mmio queue notify)"))?;
        }
    }
    let trigger = Arc::new(IrqTrigger::new(irq_evt));
    cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    let transport = MmioTransport::new(device, mem.clone(), trigger).map_err(os(
        "duplicating a queue eventfd for the virtio-mmio transport",
    ))?;
    Ok((base, Mutex::new(transport)))
}

/// The virtio-fs server keeps one open descriptor per file the guest has looked up, so with
/// the usual soft limit of 1 024 a container that touches more files than that gets EMFILE.
/// Raise the limit as virtiofsd does: to 1 048 576 (or the system's `fs.nr_open`) when
/// allowed (CAP_SYS_RESOURCE), else the soft limit to the hard one. Best effort: the old
/// limit still works for small containers.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let wanted = nr_open.unwrap_or(1 << 20).min(1 << 20).max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() && soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
        }
    }
}

fn run_vcpu(id: usize, mut vcpu: VcpuFd, bus: &Bus) -> VmExit {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
                    if let Ok(mut s) = bus.serial.lock() {
                        // The range check above keeps the offset under COM1_LEN (8).
                        s.write_bytes(((port - COM1_BASE) & 0x7) as u8, data);
                    }
                } else if port == I8042_COMMAND_PORT && data.first() == Some(&I8042_RESET) {
                    return VmExit::GuestReset;
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port) {
                    match bus.serial.lock() {
                        // The range check above keeps the offset under COM1_LEN (8).
                        Ok(mut s) => s.read_bytes(((port - COM1_BASE) & 0x7) as u8, data),
                        Err(_) => data.fill(0xff),
                    }
                } else if port == I8042_COMMAND_PORT || port == I8042_DATA_PORT {
                    data.fill(0); // controller idle: the kernel's reset path may poll it
                } else {
                    data.fill(0xff); // nothing there
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => match bus.mmio(addr) {
                Some((offset, t)) => t.lock().unwrap_or_else(|p| p.into_inner()).read(offset, data),
                None => data.fill(0),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((offset, t)) = bus.mmio(addr) {
                    t.lock().unwrap_or_else(|p| p.into_inner()).write(offset, data);
                }
            }
            Ok(VcpuExit::Hlt) => {} // the in-kernel irqchip handles HLT; nothing to do
            Ok(VcpuExit::Shutdown) => {
                return VmExit::GuestCrash(format!("vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN)"))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::GuestReset,
                    other => VmExit::GuestCrash(format!("vCPU {id}: system event {other}")),
                };
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VmExit::GuestCrash(format!(
                    "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x} on CPU {cpu})"
                ))
            }
            Ok(VcpuExit::InternalError) => return VmExit::GuestCrash(format!("vCPU {id}: KVM internal error")),
            Ok(VcpuExit::Intr) => {}
            Ok(other) => tracing::debug!("vCPU {id}: unhandled exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return VmExit::GuestCrash(format!("vCPU {id}: KVM_RUN failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags line of the mapping that starts at `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut in_mapping = false;
        for line in smaps.lines() {
            if line.contains(' ') && line.split(' ').next().is_some_and(|r| r.contains('-')) {
                in_mapping = line.starts_with(&start);
            } else if in_mapping && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping at {addr:#x} in /proc/self/smaps");
    }

    #[test]
    fn guest_memory_gets_huge_pages_only_when_asked() {
        for (thp, flag, not) in [(false, " nh", " hg"), (true, " hg", " nh")] {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
            advise_huge_pages(&mem, thp).unwrap();
            let host = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
            let flags = vm_flags(host);
            assert!(flags.contains(flag), "thp={thp}: {flags}");
            assert!(!flags.contains(not), "thp={thp}: {flags}");
        }
    }
}

//! `brig-vmm`: boot one microVM and run it until the guest resets.

// Guest values are narrowed by checked conversions, never by `as` (issue 8).
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use brig_vmm::config::{
    parse_fs, parse_mem_mib, parse_net, ConsoleTarget, FsCache, FsConfig, NetConfig, VmConfig,
    VsockConfig, DEFAULT_CMDLINE,
};
use brig_vmm::seccomp::SeccompMode;
use brig_vmm::vm::{self, VmError, VmExit};
use brig_vmm::vmm_log::CappedLog;
use clap::Parser;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

/// Exit status when the guest crashed (panic, triple fault, KVM error).
const EXIT_GUEST_CRASH: u8 = 1;
/// Exit status for a configuration the VMM cannot boot (clap uses 2 for bad flags too).
const EXIT_BAD_CONFIG: u8 = 2;

/// Boot a Brig microVM: an uncompressed vmlinux (PVH) with an initramfs on /dev/kvm.
///
/// The VMM is configured entirely by these flags. It runs until the guest resets or powers
/// off (exit status 0), the guest crashes — kernel panic, triple fault, KVM error — (status 1,
/// the reason on stderr, the panic in the console), the configuration cannot boot (status 2,
/// one line on stderr naming the problem), or it receives SIGTERM/SIGINT/SIGHUP (status 128 +
/// signal number). It removes the vsock socket it created before exiting.
#[derive(Parser, Debug)]
#[command(name = "brig-vmm", version, about, long_about)]
struct Args {
    /// Guest kernel: an uncompressed ELF vmlinux with a PVH entry note (CONFIG_PVH=y).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs handed to the kernel (Brig's holds the agent as /init).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line. virtio-mmio device declarations are appended to it.
    #[arg(long, value_name = "ARGS", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1-32).
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u32,
    /// Guest memory: 256, 256M, 1G… (64 MiB to 3 GiB).
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_mem_mib)]
    memory: u64,
    /// Back guest memory with transparent huge pages: fewer TLB misses, but the host pays
    /// 2 MiB for every range the guest touches. By default guest memory never gets them.
    #[arg(long)]
    thp: bool,
    /// Add a virtio-balloon device for free page reporting only: the guest reports memory it
    /// freed, and the host takes it back (the balloon never inflates).
    #[arg(long)]
    free_page_reporting: bool,
    /// Guest console (COM1): `stdout`, `off`, or a file path to append to.
    #[arg(long, default_value = "stdout", value_name = "DEST")]
    console: String,
    /// Cap of a console file in bytes (at least 16384): past it, only the newest half is
    /// kept, so a guest cannot fill the host's disk or memory through its console.
    #[arg(long, default_value_t = brig_vmm::console_file::DEFAULT_LIMIT, value_name = "BYTES")]
    console_limit: u64,
    /// Cap of this VMM's own log in bytes (at least 16384) when stderr is a file: past it,
    /// only the newest half is kept, so warnings a guest triggers cannot fill the host.
    #[arg(long, default_value_t = brig_vmm::vmm_log::DEFAULT_LIMIT, value_name = "BYTES")]
    log_limit: u64,
    /// Add a virtio-vsock device whose host side is this Unix socket (hybrid vsock): connect
    /// and write `CONNECT <port>\n` to reach a guest port; guest connections to host port P
    /// go to `<PATH>_<P>`. The path must not exist.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// Guest context ID of the vsock device.
    #[arg(long, default_value_t = 3, value_name = "CID", requires = "vsock_uds")]
    vsock_cid: u64,
    /// Add a virtio-fs device sharing host directory DIR under mount tag TAG (served inside
    /// the VMM; the guest cannot reach outside DIR).
    #[arg(long, value_name = "TAG=DIR", value_parser = parse_fs)]
    fs: Option<FsConfig>,
    /// What the guest may cache of the --fs share.
    #[arg(long, value_enum, default_value_t = FsCache::Auto, requires = "fs")]
    fs_cache: FsCache,
    /// Add a virtio-net device whose frames go through a TAP: `fd=N,mac=MAC[,mtu=M]` takes the
    /// TAP the parent opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and passed as descriptor N
    /// (left open across exec); `tap=NAME,mac=MAC[,mtu=M]` attaches to TAP NAME in the VMM's
    /// network namespace, creating it if missing (needs CAP_NET_ADMIN there). MAC is the
    /// guest's address (e.g. 02:00:00:00:00:01, unicast); M, the MTU the guest is told (68 to
    /// 65535), should match the TAP's. `offload=off` offers the guest no checksum or
    /// segmentation offloads. Example: `--net fd=3,mac=02:00:00:00:00:01,mtu=1500`.
    #[arg(long, value_name = "fd=N|tap=NAME,mac=MAC[,mtu=M][,offload=on|off]", value_parser = parse_net)]
    net: Option<NetConfig>,
    /// System call filters per thread: `enforce` stops the VMM (status 159, the call named on
    /// stderr) when a thread makes a call its job does not need; `log` only has the kernel
    /// log it (audit type 1326); `off` installs none.
    #[arg(long, value_enum, default_value_t = SeccompMode::Enforce, value_name = "MODE")]
    seccomp: SeccompMode,
    /// Do not move into namespaces of our own. By default the VM runs as PID 1 of a PID
    /// namespace of its own (this process stays outside, forwarding signals and exiting as it
    /// does), and once its devices exist its root becomes the directory of --vsock-uds (else
    /// the --fs directory), which must then hold the --fs directory; this needs CAP_SYS_ADMIN.
    #[arg(long)]
    no_confine: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // A file on stderr (the runtime's vmm.log) is capped: the guest can make us warn.
    let (writer, ansi) = match CappedLog::for_stderr(args.log_limit) {
        Ok(Some(log)) => (BoxMakeWriter::new(Mutex::new(log)), false),
        Ok(None) => (BoxMakeWriter::new(std::io::stderr), true),
        Err(e) => {
            eprintln!("brig-vmm: cannot cap the log on stderr, writing it uncapped: {e}");
            (BoxMakeWriter::new(std::io::stderr), false)
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BRIG_LOG")
                // virtio-queue logs an error for each bad index a guest writes, past our
                // rate limit: the devices report those themselves, rate-limited.
                .unwrap_or_else(|_| "warn,virtio_queue=off".into()),
        )
        .with_writer(writer)
        .with_ansi(ansi)
        .init();
    // First, while we are one thread: the VM runs as PID 1 of a namespace of its own, and this
    // process stays outside as its supervisor (the runtime's "VMM").
    if !args.no_confine {
        if let Err(e) = brig_vmm::pid_ns::enter(args.seccomp) {
            eprintln!("brig-vmm: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    }
    let console = match args.console.as_str() {
        "stdout" => ConsoleTarget::Stdout,
        "off" => ConsoleTarget::Off,
        path => ConsoleTarget::File {
            path: path.into(),
            limit: args.console_limit,
        },
    };
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: u8::try_from(args.cpus).unwrap_or(u8::MAX),
        mem_mib: args.memory,
        thp: args.thp,
        free_page_reporting: args.free_page_reporting,
        console,
        vsock: args.vsock_uds.map(|uds| VsockConfig {
            guest_cid: args.vsock_cid,
            uds,
        }),
        fs: args.fs.map(|fs| FsConfig {
            cache: args.fs_cache,
            ..fs
        }),
        net: args.net,
        seccomp: args.seccomp,
        confine: !args.no_confine,
    };
    // Where the socket is, resolved while host paths still resolve (the VMM confines itself).
    let uds = config
        .vsock
        .as_ref()
        .map(|v| brig_vmm::confine::canonical(&v.uds));
    let result = vm::run(&config);
    // The vsock device owns its socket, but vCPU threads may still hold the device when we
    // exit: remove the socket here so that no exit path leaves it behind.
    let created_socket = !matches!(result, Err(VmError::Config(_)) | Err(VmError::Vsock(_)));
    if let (true, Some(uds)) = (
        created_socket,
        uds.as_deref().and_then(brig_vmm::confine::visible),
    ) {
        let _ = std::fs::remove_file(uds);
    }
    brig_vmm::guest_warn::report_unreported();
    let code = match result {
        Ok(VmExit::GuestReset) => 0,
        Ok(VmExit::GuestPanic(line)) => {
            eprintln!("brig-vmm: guest kernel panicked: {line}");
            EXIT_GUEST_CRASH
        }
        Ok(VmExit::GuestCrash(reason)) => {
            eprintln!("brig-vmm: guest crashed: {reason}");
            EXIT_GUEST_CRASH
        }
        Ok(VmExit::Signal(sig)) => 128u8.saturating_add(u8::try_from(sig).unwrap_or(u8::MAX)),
        Ok(VmExit::VmmFailure(reason)) => {
            eprintln!("brig-vmm: {reason}");
            EXIT_GUEST_CRASH
        }
        Err(e) => {
            eprintln!("brig-vmm: {e}");
            EXIT_BAD_CONFIG
        }
    };
    // vCPU threads may be parked in KVM_RUN; leave without waiting for them.
    std::process::exit(code.into())
}

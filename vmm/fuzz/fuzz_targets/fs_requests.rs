//! Guest-controlled FUSE requests in guest-controlled descriptor chains, through the
//! virtio-fs device's request path (the same `Fs` the VMM runs, with its passthrough file
//! server over a scratch shared directory): every chain is served or returned empty, the
//! device never panics, and it returns at most the chains it was given (unless the guest's
//! buffers overlap its own rings, when only the first two hold).
//!
//! Input: byte 0 = mode (bit 0: the chains go on the high-priority queue instead of the
//! request queue); byte 1 = number of descriptors (1..=16); then 13 bytes per descriptor
//! (addr u64, len u32, flags u8: bit 1 device-writable, bit 7 ends a chain, the other bits
//! as the guest wrote them); the rest is written to guest memory at 0x1000 (the FUSE
//! requests of the seeds sit there, their reply buffers at 0x10000).
//!
//! Each input gets a device reset first (so a fresh file server, as a new driver would) and
//! a shared directory holding only `a` (a small file) and `d` (an empty directory).
#![no_main]

#[path = "common/chains.rs"]
mod chains;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use brig_vmm::devices::virtio::fs::Fs;
use brig_vmm::devices::virtio::{GuestMemory, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x30000;
const QSIZE: u16 = 16;
const TABLE: u64 = 0x20000;
const HIPRIO_RINGS: u64 = 0x21000;
const REQUEST_RINGS: u64 = 0x22000;
/// The end of the harness's table and rings.
const RINGS_END: u64 = 0x23000;

/// The scratch shared directory (created once per fuzzing process) and the device over it.
fn device() -> &'static Mutex<(PathBuf, Fs)> {
    static DEVICE: OnceLock<Mutex<(PathBuf, Fs)>> = OnceLock::new();
    DEVICE.get_or_init(|| {
        remove_stale_shares();
        let dir = std::env::temp_dir().join(format!("{SHARE_PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let fs = Fs::new("fuzz", dir.clone()).unwrap();
        let dir = fs.shared_dir().to_path_buf();
        Mutex::new((dir, fs))
    })
}

/// The scratch share is `<tmp>/brig-fuzz-fs-<pid>`: libFuzzer ends the process with
/// `exit()`, so nothing removes it then; each run removes those of processes gone.
const SHARE_PREFIX: &str = "brig-fuzz-fs-";

fn remove_stale_shares() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(SHARE_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Put the shared directory back to `a` and `d` and nothing else.
fn reset_share(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
        }
    }
    let _ = std::fs::write(dir.join("a"), b"hello\n");
    let _ = std::fs::create_dir(dir.join("d"));
}

/// The used ring's address for a queue whose available ring is at `avail`.
fn used_ring(avail: u64) -> u64 {
    (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3
}

/// A queue of QSIZE over the descriptor table, its rings at `rings`, with the chains
/// starting at `heads` made available.
fn queue(mem: &GuestMemory, rings: u64, heads: &[u16]) -> Queue {
    for (i, head) in heads.iter().enumerate() {
        mem.write_obj(*head, GuestAddress(rings + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(rings + 2))
        .unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_desc_table_address(Some(TABLE as u32), Some(0));
    q.set_avail_ring_address(Some(rings as u32), Some(0));
    q.set_used_ring_address(Some(used_ring(rings) as u32), Some(0));
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let hiprio = data[0] & 1 != 0;
    let count = usize::from(data[1] % 16) + 1;
    let rest = &data[2..];
    if rest.len() < count * chains::RECORD {
        return;
    }
    let (descs, payload) = rest.split_at(count * chains::RECORD);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let payload = &payload[..payload.len().min(0x8000)];
    mem.write_slice(payload, GuestAddress(0x1000)).unwrap();

    let heads = chains::write_table(&mem, TABLE, descs);
    let (hiprio_heads, request_heads): (&[u16], &[u16]) =
        if hiprio { (&heads, &[]) } else { (&[], &heads) };
    let queues = vec![
        queue(&mem, HIPRIO_RINGS, hiprio_heads),
        queue(&mem, REQUEST_RINGS, request_heads),
    ];

    let mut device = device().lock().unwrap();
    let (dir, fs) = &mut *device;
    fs.reset();
    reset_share(dir);
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    fs.activate(mem.clone(), queues, irq, VIRTIO_F_VERSION_1)
        .unwrap();
    fs.serve_available();

    if chains::may_write_rings(descs, TABLE, RINGS_END) {
        return;
    }
    for (rings, given) in [(HIPRIO_RINGS, hiprio_heads), (REQUEST_RINGS, request_heads)] {
        let used: u16 = mem.read_obj(GuestAddress(used_ring(rings) + 2)).unwrap();
        assert!(
            usize::from(used) <= given.len(),
            "returned {used} of {} chains",
            given.len()
        );
    }
});

//! Guest-controlled free page reports on the balloon's reporting queue: every chain is either
//! refused whole or turned into ranges that are whole pages inside guest RAM, which are then
//! really discarded (MADV_DONTNEED on the fuzz process's own guest memory); never a panic,
//! never a range outside guest memory.
//!
//! Input: byte 0 = number of descriptors (1..=16); then 13 bytes per descriptor (addr u64,
//! len u32, flags u8: bit 7 ends a chain, the other bits as the guest wrote them).
#![no_main]

#[path = "common/chains.rs"]
mod chains;

use brig_vmm::devices::virtio::balloon::reported_ranges;
use brig_vmm::devices::virtio::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory as _};

/// Guest RAM: 2 MiB, so 2 MiB reports (what Linux sends) fit once.
const MEM_SIZE: usize = 2 << 20;
const QSIZE: u16 = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 16) + 1;
    if rest.len() < count * chains::RECORD {
        return;
    }
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let table = 0x1000u64;
    let heads = chains::write_table(&mem, table, &rest[..count * chains::RECORD]);
    let avail = 0x2000u64;
    let used = 0x3000u64;
    for (i, head) in heads.iter().enumerate() {
        mem.write_obj(*head, GuestAddress(avail + 4 + 2 * i as u64)).unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(avail + 2)).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_desc_table_address(Some(table as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);

    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        if let Ok(ranges) = reported_ranges(&mem, chain) {
            for r in ranges {
                assert!(r.len > 0 && r.len % 4096 == 0 && r.host % 4096 == 0);
                assert!(r.host >= base && r.host + r.len <= base + MEM_SIZE, "{r:?}");
                // SAFETY: the range was just checked to lie inside `mem`'s anonymous mapping.
                let rc = unsafe { libc::madvise(r.host as *mut libc::c_void, r.len, libc::MADV_DONTNEED) };
                assert_eq!(rc, 0);
            }
        }
    }
});

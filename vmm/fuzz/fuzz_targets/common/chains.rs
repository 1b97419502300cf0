//! Descriptor chains from fuzz input, shared by the targets that feed a device's queues:
//! each 13-byte record is one descriptor (address u64 LE, length u32 LE, flags u8); the
//! flags' top bit ends a chain there (the last record always does), the rest are the
//! descriptor's flags with NEXT set by the chain layout, not by the input.

use brig_vmm::devices::virtio::GuestMemory;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Address, Bytes, GuestAddress};

/// Bytes of input per descriptor.
pub const RECORD: usize = 13;
const F_NEXT: u16 = 1;
const END_OF_CHAIN: u8 = 0x80;

/// Write the descriptors of `records` (whole records only) as a table at `table` in `mem`;
/// the head index of each chain, in order.
pub fn write_table(mem: &GuestMemory, table: u64, records: &[u8]) -> Vec<u16> {
    let count = records.len() / RECORD;
    let mut heads = vec![0u16];
    for (i, d) in records.chunks_exact(RECORD).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        let last = i + 1 == count || d[12] & END_OF_CHAIN != 0;
        let mut flags = u16::from(d[12] & !END_OF_CHAIN) & !F_NEXT;
        if !last {
            flags |= F_NEXT;
        } else if i + 1 < count {
            heads.push((i + 1) as u16);
        }
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16));
        mem.write_obj(desc, GuestAddress(table).unchecked_add(16 * i as u64))
            .unwrap();
    }
    heads
}

/// Whether the device may write over `[start, end)` (the harness's table and rings) while
/// serving `records`: a device-writable descriptor overlaps it, or a descriptor is indirect
/// (its table lies in guest memory, beyond what the input says directly). A guest may point
/// its buffers at its own rings; the device must survive that, but then the rings' indices
/// are the guest's scribbles, and counts read from them prove nothing.
pub fn may_write_rings(records: &[u8], start: u64, end: u64) -> bool {
    const F_WRITE: u8 = 2;
    const F_INDIRECT: u8 = 4;
    records.chunks_exact(RECORD).any(|d| {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let len = u64::from(u32::from_le_bytes(d[8..12].try_into().unwrap()));
        d[12] & F_INDIRECT != 0
            || (d[12] & F_WRITE != 0 && addr < end && addr.saturating_add(len) > start)
    })
}

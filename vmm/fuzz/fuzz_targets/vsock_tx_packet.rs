//! Guest-controlled virtqueue descriptors and packet headers: the vsock TX and RX chain
//! parsers take any layout the guest writes and return a packet or an error, never panic.
//!
//! Input: byte 0 = number of descriptors (1..=8); then 13 bytes per descriptor (addr u64,
//! len u32, flags u8; addresses may point outside guest memory); the rest is written to
//! guest memory at 0x1000 (where packet headers and data usually sit).
#![no_main]

use brig_vmm::devices::virtio::vsock::packet::{read_tx_packet, RxBuffer};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x20000;
const QUEUE_BASE: u64 = 0x10000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8) + 1;
    if rest.len() < count * 13 {
        return;
    }
    let (descs, payload) = rest.split_at(count * 13);
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let payload = &payload[..payload.len().min(0x8000)];
    mem.write_slice(payload, GuestAddress(0x1000)).unwrap();

    let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_BASE), QSIZE);
    for (i, d) in descs.chunks_exact(13).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        let mut flags = u16::from(d[12]) & !F_NEXT; // chaining is ours to decide
        if i + 1 < count {
            flags |= F_NEXT;
        }
        let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (i + 1) as u16));
        mem.write_obj(desc, mock.desc_table_addr().unchecked_add(16 * i as u64))
            .unwrap();
    }
    mem.write_obj(0u16, mock.avail_addr().unchecked_add(4))
        .unwrap();
    mem.write_obj(1u16, mock.avail_addr().unchecked_add(2))
        .unwrap();

    let mut queue: Queue = mock.create_queue().unwrap();
    if let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let mut buf = Vec::new();
        if let Ok(header) = read_tx_packet(&mem, chain.clone(), &mut buf) {
            assert_eq!(buf.len(), header.len as usize);
        }
        let _ = RxBuffer::parse(&mem, chain);
    }
});

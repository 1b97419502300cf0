//! Guest-controlled virtqueue descriptors on the virtio-net queues: the TX path takes any
//! chain to the "TAP" (here /dev/null) or drops it, and the RX path puts a frame into any set
//! of posted chains or drops it, never panics, and reports used lengths that add up.
//!
//! Input: byte 0 = mode (bit 0: MRG_RXBUF negotiated); byte 1 = number of descriptors
//! (1..=16); bytes 2-3 = RX frame length (u16 LE, plus byte 0's bit 1 times 65536, so frames
//! past the maximum are tried too); then 13 bytes per descriptor (addr u64, len u32, flags u8:
//! bit 1 device-writable, bit 7 ends a chain, the other bits as the guest wrote them);
//! the rest is written to guest memory at 0x1000. Every chain goes to TX, then to RX.
#![no_main]

#[path = "common/chains.rs"]
mod chains;

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use brig_vmm::devices::virtio::net::frame::{
    deliver_rx_frame, send_tx_chain, RxOutcome, RxScratch, TxScratch, MAX_FRAME_LEN, NET_HDR_LEN,
};
use brig_vmm::devices::virtio::GuestMemory;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 0x30000;
const QSIZE: u16 = 16;

/// A queue of QSIZE over the descriptor table at `table`, its rings at `rings`, with the
/// chains starting at `heads` made available.
fn queue(mem: &GuestMemory, table: u64, rings: u64, heads: &[u16]) -> Queue {
    let avail = rings;
    let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
    for (i, head) in heads.iter().enumerate() {
        mem.write_obj(*head, GuestAddress(avail + 4 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(heads.len() as u16, GuestAddress(avail + 2))
        .unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_desc_table_address(Some(table as u32), Some(0));
    q.set_avail_ring_address(Some(avail as u32), Some(0));
    q.set_used_ring_address(Some(used as u32), Some(0));
    q.set_ready(true);
    q
}

fn dev_null() -> &'static File {
    static NULL: OnceLock<File> = OnceLock::new();
    NULL.get_or_init(|| File::options().write(true).open("/dev/null").unwrap())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mergeable = data[0] & 1 != 0;
    let count = usize::from(data[1] % 16) + 1;
    let frame_len = usize::from(u16::from_le_bytes([data[2], data[3]]))
        + if data[0] & 2 != 0 { 65536 } else { 0 };
    let rest = &data[4..];
    if rest.len() < count * chains::RECORD {
        return;
    }
    let (descs, payload) = rest.split_at(count * chains::RECORD);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let payload = &payload[..payload.len().min(0x8000)];
    mem.write_slice(payload, GuestAddress(0x1000)).unwrap();

    // One descriptor table for both queues; chains end where the input says.
    let table = 0x20000u64;
    let heads = chains::write_table(&mem, table, descs);

    // TX: every chain is sent whole or refused.
    let mut txq = queue(&mem, table, 0x21000, &heads);
    let mut tx = TxScratch::default();
    while let Some(chain) = txq.pop_descriptor_chain(&mem) {
        if let Ok(n) = send_tx_chain(&mem, chain, dev_null().as_fd(), &mut tx) {
            assert!((NET_HDR_LEN..=MAX_FRAME_LEN).contains(&n));
        }
    }

    // RX: the same chains as posted buffers (a second queue over the same table).
    let mut rxq = queue(&mem, table, 0x22000, &heads);
    let mut frame = vec![0xa5u8; frame_len.min(MAX_FRAME_LEN + 16)];
    let mut rx = RxScratch::default();
    let used_before = rxq.next_used();
    // Buffers over the rings make the available index the guest's scribble (still no panic).
    let scribbled = chains::may_write_rings(descs, table, 0x23000);
    match deliver_rx_frame(&mut rxq, &mem, &mut frame, mergeable, &mut rx) {
        Ok(RxOutcome::Delivered(n)) => {
            assert!(n >= 1 && (scribbled || usize::from(n) <= heads.len()));
            assert!(mergeable || n == 1);
            assert_eq!(rxq.next_used().wrapping_sub(used_before), n);
            if frame.len() >= NET_HDR_LEN {
                assert_eq!(u16::from_le_bytes([frame[10], frame[11]]), n);
            }
        }
        Ok(RxOutcome::NoBuffers) => assert_eq!(rxq.next_used(), used_before),
        Ok(RxOutcome::Dropped(_)) | Err(_) => {}
    }
});

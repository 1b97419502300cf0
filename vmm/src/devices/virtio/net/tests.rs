//! Tests for the net device: a fake guest driver writes descriptor chains into guest memory
//! and kicks the queues; a `SOCK_SEQPACKET` socket pair stands in for the TAP (it keeps frame
//! boundaries as a TAP does); a real `EventManager` runs the device until it is idle.

use std::sync::{Arc, Mutex};

use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;
use event_manager::{EventManager, SubscriberOps};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use socket2::Socket;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use std::os::fd::{AsFd, AsRawFd};

use super::*;

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 128;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Guest buffers are allocated from here up.
const BUF_BASE: u64 = 0x10_0000;
const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MRG: u64 = 1 << vn::VIRTIO_NET_F_MRG_RXBUF;

/// The driver side of one split virtqueue.
struct Driver {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    /// The rings are laid out here rather than by `virtio_queue::mock::MockSplitQueue`,
    /// whose 0.17 layout puts the used ring over the second half of the available ring (a
    /// queue of 128 then loses entries once the driver has made 64 buffers available).
    fn new(mem: &GuestMemoryMmap, base: u64) -> (Self, Queue) {
        let desc = GuestAddress(base);
        let avail = desc.unchecked_add(16 * u64::from(QSIZE));
        let used = GuestAddress((avail.0 + 6 + 2 * u64::from(QSIZE) + 3) & !3);
        let mut q = Queue::new(QSIZE).unwrap();
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (lo, hi) = split(desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        assert!(q.is_valid(mem));
        let d = Driver {
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        (d, q)
    }

    /// Publish a chain of (address, length, device-writable) descriptors; returns its head.
    fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            let next = (idx + 1) % QSIZE;
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(d, self.desc.unchecked_add(u64::from(idx) * 16))
                .unwrap();
            self.next_desc = next;
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
        head
    }

    /// Whether a driver that made buffers available from index `old` up to now must notify
    /// the device under EVENT_IDX (the device's `avail_event`, as Linux's vring_need_event).
    fn needs_kick(&self, mem: &GuestMemoryMmap, old: u16) -> bool {
        let event: u16 = mem
            .read_obj(self.used.unchecked_add(4 + 8 * u64::from(QSIZE)))
            .unwrap();
        self.avail_idx.wrapping_sub(event).wrapping_sub(1) < self.avail_idx.wrapping_sub(old)
    }

    /// Used entries (head, length) published since the last call.
    fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_seen % QSIZE));
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((u16::try_from(id).unwrap(), len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Net>>,
    em: EventManager<Arc<Mutex<Net>>>,
    rxq: Driver,
    txq: Driver,
    next_buf: u64,
    /// The network's side of the "TAP" (none with a real TAP).
    peer: Option<Socket>,
    irq: Arc<IrqTrigger>,
}

fn header(flags: u8) -> [u8; NET_HDR_LEN] {
    // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
    [flags, 0, 14, 0, 0, 0, 34, 0, 16, 0, 0, 0]
}

/// A frame as the TAP carries it: header, then `len` bytes of Ethernet frame.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = header(1).to_vec();
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

impl Harness {
    fn new(features: u64) -> Self {
        Self::with_mtu(features, None)
    }

    fn with_mtu(features: u64, mtu: Option<u16>) -> Self {
        let (ours, peer) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let peer = Socket::from(peer);
        peer.set_nonblocking(true).unwrap();
        let tap = Tap::from_frame_socket(ours).unwrap();
        Self::with_tap(tap, Some(peer), features, mtu)
    }

    fn with_tap(tap: Tap, peer: Option<Socket>, features: u64, mtu: Option<u16>) -> Self {
        let mut h = Self::activated(tap, peer, features, mtu);
        h.run();
        h
    }

    /// The device activated by a driver, its event loop not yet run.
    fn activated(tap: Tap, peer: Option<Socket>, features: u64, mtu: Option<u16>) -> Self {
        let dev = Arc::new(Mutex::new(Net::new(tap, MAC, mtu).unwrap()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (rxq, q0) = Driver::new(&mem, 0);
        let (txq, q1) = Driver::new(&mem, 0x4000);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        dev.lock()
            .unwrap()
            .activate(
                mem.clone(),
                vec![q0, q1],
                irq.clone(),
                VIRTIO_F_VERSION_1 | features,
            )
            .unwrap();
        Harness {
            mem,
            dev,
            em,
            rxq,
            txq,
            next_buf: BUF_BASE,
            peer,
            irq,
        }
    }

    /// Run the event loop until it is idle; a busy loop that never settles is a bug.
    fn run(&mut self) {
        for _ in 0..200 {
            if self.em.run_with_timeout(0).unwrap() == 0 {
                return;
            }
        }
        panic!("the event loop never went idle (busy loop)");
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.next_buf;
        self.next_buf += (len as u64 + 0xf) & !0xf;
        assert!(
            self.next_buf < MEM_SIZE as u64,
            "test ran out of guest memory"
        );
        at
    }

    fn kick(&mut self, q: usize) {
        self.dev.lock().unwrap().queue_events()[q].write(1).unwrap();
        self.run();
    }

    fn counters(&self) -> NetCounters {
        self.dev.lock().unwrap().counters()
    }

    /// Put a TX chain of the given (content, device-writable) buffers; returns its head.
    fn tx_chain(&mut self, parts: &[(&[u8], bool)]) -> u16 {
        let mut descs = Vec::new();
        for (content, writable) in parts {
            let at = self.alloc(content.len().max(1));
            self.mem.write_slice(content, GuestAddress(at)).unwrap();
            descs.push((at, u32::try_from(content.len()).unwrap(), *writable));
        }
        self.txq.add_chain(&self.mem, &descs)
    }

    /// Post `n` RX chains of one writable buffer of `size` bytes; returns (head, address).
    fn rx_buffers(&mut self, n: usize, size: u32) -> Vec<(u16, u64)> {
        (0..n)
            .map(|_| {
                let at = self.alloc(size as usize);
                (self.rxq.add_chain(&self.mem, &[(at, size, true)]), at)
            })
            .collect()
    }

    /// Frames the device wrote to the TAP so far.
    fn tap_frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        loop {
            // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
            let n = unsafe {
                libc::recv(
                    std::os::fd::AsRawFd::as_raw_fd(self.peer()),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                return out;
            };
            out.push(buf[..n].to_vec());
        }
    }

    /// The network sends `bytes` (header and frame) to the guest.
    fn network_sends(&self, bytes: &[u8]) {
        self.peer().send(bytes).unwrap();
    }

    /// Whether the device interrupted the guest since the last call (and acknowledge it).
    fn interrupted(&self) -> bool {
        let raised = self.irq.eventfd().read().is_ok();
        let status = self.irq.status();
        self.irq.ack(status);
        raised && status & VIRTIO_MMIO_INT_VRING != 0
    }

    fn peer(&self) -> &Socket {
        self.peer
            .as_ref()
            .expect("a socket pair stands in for the TAP")
    }

    fn guest_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

/// What the guest should find: the frame with `num_buffers` filled in.
fn as_received(sent: &[u8], num_buffers: u16) -> Vec<u8> {
    let mut v = sent.to_vec();
    v[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    v
}

#[test]
fn a_guest_frame_reaches_the_tap_byte_exact_with_its_header() {
    let mut h = Harness::new(MRG);
    let f = frame(1500, 1);
    let head = h.tx_chain(&[(&f, false)]);
    h.kick(TXQ);
    assert_eq!(h.tap_frames(), vec![f.clone()]);
    assert_eq!(h.txq.take_used(&h.mem), vec![(head, 0)]);
    // The same frame scattered: the header split over two descriptors, the data over three.
    let head = h.tx_chain(&[
        (&f[..5], false),
        (&f[5..12], false),
        (&f[12..100], false),
        (&f[100..101], false),
        (&f[101..], false),
    ]);
    h.kick(TXQ);
    assert_eq!(h.tap_frames(), vec![f]);
    assert_eq!(h.txq.take_used(&h.mem), vec![(head, 0)]);
    assert_eq!(
        h.counters(),
        NetCounters {
            tx_frames: 2,
            ..Default::default()
        }
    );
}

#[test]
fn malformed_tx_chains_are_dropped_and_counted_and_the_next_frame_still_goes() {
    let mut h = Harness::new(MRG);
    let good = frame(60, 2);
    let big = vec![0u8; MAX_FRAME_LEN - 12 + 1];
    let mut heads = vec![
        // Shorter than the header.
        h.tx_chain(&[(&good[..11], false)]),
        // A device-writable descriptor on TX.
        h.tx_chain(&[(&good[..12], false), (&good[12..], true)]),
        // A zero-length descriptor.
        h.tx_chain(&[(&good[..12], false), (&[], false), (&good[12..], false)]),
        // One byte over the largest frame.
        h.tx_chain(&[(&good[..12], false), (&big, false)]),
    ];
    // Outside guest memory.
    heads.push(h.txq.add_chain(&h.mem, &[(MEM_SIZE as u64 - 8, 64, false)]));
    // Zero length, alone.
    heads.push(h.txq.add_chain(&h.mem, &[(BUF_BASE, 0, false)]));
    heads.push(h.tx_chain(&[(&good, false)]));
    h.kick(TXQ);
    assert_eq!(h.tap_frames(), vec![good]);
    let used: Vec<u16> = h.txq.take_used(&h.mem).iter().map(|u| u.0).collect();
    assert_eq!(used, heads, "every chain is returned, in order");
    assert_eq!(
        h.counters(),
        NetCounters {
            tx_frames: 1,
            tx_dropped: 6,
            ..Default::default()
        }
    );
}

#[test]
fn the_largest_frame_passes_whole() {
    let mut h = Harness::new(MRG);
    // The socket pair's buffer must take a 64 KiB frame.
    h.peer().set_recv_buffer_size(1 << 20).unwrap();
    let f = frame(MAX_FRAME_LEN - NET_HDR_LEN, 3);
    h.tx_chain(&[(&f[..40000], false), (&f[40000..], false)]);
    h.kick(TXQ);
    assert_eq!(h.tap_frames(), vec![f]);
}

#[test]
fn a_tap_that_takes_no_more_drops_and_counts_and_the_loop_keeps_going() {
    let mut h = Harness::new(MRG);
    let f = frame(1500, 4);
    // Nobody reads the network side: the socket fills up and refuses frames (EAGAIN).
    let mut sent = 0usize;
    for _ in 0..8 {
        for _ in 0..100 {
            h.tx_chain(&[(&f, false)]);
        }
        h.kick(TXQ);
        sent += 100;
        let used = h.txq.take_used(&h.mem);
        assert_eq!(used.len(), 100, "every chain comes back");
    }
    let c = h.counters();
    assert!(c.tx_dropped > 0, "{c:?}");
    assert_eq!(c.tx_frames + c.tx_dropped, sent as u64);
    // Once the network reads again, frames flow again.
    let delivered = h.tap_frames().len();
    assert_eq!(delivered as u64, c.tx_frames);
    h.tx_chain(&[(&f, false)]);
    h.kick(TXQ);
    assert_eq!(h.tap_frames(), vec![f]);
}

#[test]
fn a_network_frame_lands_in_a_guest_buffer_with_its_header_and_num_buffers() {
    let mut h = Harness::new(MRG);
    let bufs = h.rx_buffers(4, 2048);
    h.kick(RXQ);
    let f = frame(100, 5);
    h.network_sends(&f);
    h.run();
    assert_eq!(h.rxq.take_used(&h.mem), vec![(bufs[0].0, 112)]);
    assert_eq!(h.guest_bytes(bufs[0].1, 112), as_received(&f, 1));
    assert_eq!(h.counters().rx_frames, 1);
}

#[test]
fn a_frame_spans_several_buffers_with_mrg_rxbuf() {
    let mut h = Harness::new(MRG);
    let bufs = h.rx_buffers(5, 1024);
    h.kick(RXQ);
    let f = frame(3000, 6); // 3012 bytes: three buffers
    h.network_sends(&f);
    h.run();
    let used = h.rxq.take_used(&h.mem);
    assert_eq!(
        used,
        vec![(bufs[0].0, 1024), (bufs[1].0, 1024), (bufs[2].0, 964)]
    );
    let mut got = Vec::new();
    for (&(_, len), &(_, at)) in used.iter().zip(&bufs) {
        got.extend(h.guest_bytes(at, len as usize));
    }
    assert_eq!(got, as_received(&f, 3));
    // A frame that needs more buffers than the guest posted waits for them.
    let f2 = frame(3000, 7);
    h.network_sends(&f2);
    h.run();
    assert!(h.rxq.take_used(&h.mem).is_empty());
    let more = h.rx_buffers(1, 2048);
    h.kick(RXQ);
    let used = h.rxq.take_used(&h.mem);
    assert_eq!(
        used,
        vec![(bufs[3].0, 1024), (bufs[4].0, 1024), (more[0].0, 964)]
    );
    let mut got = h.guest_bytes(bufs[3].1, 1024);
    got.extend(h.guest_bytes(bufs[4].1, 1024));
    got.extend(h.guest_bytes(more[0].1, 964));
    assert_eq!(got, as_received(&f2, 3));
    assert_eq!(h.counters().rx_frames, 2);
}

#[test]
fn with_event_idx_the_device_asks_for_the_buffers_a_waiting_frame_needs() {
    let mut h = Harness::new(MRG | VIRTIO_RING_F_EVENT_IDX);
    let first = h.rx_buffers(2, 1024);
    h.kick(RXQ);
    // A frame that needs three buffers arrives: two are there, so it waits.
    let f = frame(3000, 80);
    h.network_sends(&f);
    h.run();
    assert!(h.rxq.take_used(&h.mem).is_empty());
    // The guest posts one more and notifies only if the device asked (avail_event): a
    // device that forgot to ask would never hear of it, and the frame would wait forever.
    let old = h.rxq.avail_idx;
    let more = h.rx_buffers(1, 1024);
    assert!(
        h.rxq.needs_kick(&h.mem, old),
        "the device asked to hear of new buffers"
    );
    h.kick(RXQ);
    let used = h.rxq.take_used(&h.mem);
    assert_eq!(
        used,
        vec![(first[0].0, 1024), (first[1].0, 1024), (more[0].0, 964)]
    );
}

#[test]
fn without_mrg_rxbuf_a_frame_too_big_for_one_buffer_is_dropped_and_counted() {
    let mut h = Harness::new(0);
    let bufs = h.rx_buffers(2, 1024);
    h.kick(RXQ);
    h.network_sends(&frame(2000, 8));
    let small = frame(60, 9);
    h.network_sends(&small);
    h.run();
    assert_eq!(
        h.rxq.take_used(&h.mem),
        vec![(bufs[0].0, 0), (bufs[1].0, 72)]
    );
    assert_eq!(h.guest_bytes(bufs[1].1, 72), as_received(&small, 1));
    let c = h.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 1));
}

#[test]
fn a_malformed_rx_chain_drops_that_frame_only() {
    let mut h = Harness::new(MRG);
    // A device-readable RX buffer, then a good one.
    let bad_at = h.alloc(2048);
    let bad = h.rxq.add_chain(&h.mem, &[(bad_at, 2048, false)]);
    let oob = h
        .rxq
        .add_chain(&h.mem, &[(MEM_SIZE as u64 - 16, 2048, true)]);
    let good = h.rx_buffers(1, 2048);
    h.kick(RXQ);
    h.network_sends(&frame(100, 10));
    h.network_sends(&frame(100, 11));
    let f = frame(100, 12);
    h.network_sends(&f);
    h.run();
    assert_eq!(
        h.rxq.take_used(&h.mem),
        vec![(bad, 0), (oob, 0), (good[0].0, 112)]
    );
    assert_eq!(h.guest_bytes(good[0].1, 112), as_received(&f, 1));
    let c = h.counters();
    assert_eq!((c.rx_frames, c.rx_dropped), (1, 2));
}

#[test]
fn a_short_frame_from_the_network_is_dropped() {
    let mut h = Harness::new(MRG);
    let bufs = h.rx_buffers(1, 2048);
    h.kick(RXQ);
    h.network_sends(&[1, 2, 3]);
    let f = frame(50, 13);
    h.network_sends(&f);
    h.run();
    assert_eq!(h.rxq.take_used(&h.mem), vec![(bufs[0].0, 62)]);
    assert_eq!(h.counters().rx_dropped, 1);
}

#[test]
fn rx_without_buffers_waits_without_spinning_and_resumes_when_buffers_come() {
    let mut h = Harness::new(MRG);
    // Frames arrive before the guest posted any buffer: the loop must go idle (run()
    // panics on a busy loop), nothing is lost but what the TAP queue itself would drop.
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(200, 20 + i)).collect();
    for f in &frames {
        h.network_sends(f);
    }
    h.run();
    h.network_sends(&frame(200, 30));
    h.run();
    assert!(h.rxq.take_used(&h.mem).is_empty());
    // Buffers come back later: the held frame and the ones still in the TAP are delivered.
    let bufs = h.rx_buffers(8, 2048);
    h.kick(RXQ);
    let used = h.rxq.take_used(&h.mem);
    assert_eq!(used.len(), 4, "{used:?}");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(used[i], (bufs[i].0, 212));
        assert_eq!(h.guest_bytes(bufs[i].1, 212), as_received(f, 1));
    }
    // And the TAP is watched again: a later frame arrives without any kick.
    let later = frame(80, 40);
    h.network_sends(&later);
    h.run();
    assert_eq!(h.rxq.take_used(&h.mem), vec![(bufs[4].0, 92)]);
    assert_eq!(h.counters().rx_frames, 5);
}

#[test]
fn a_flood_from_the_network_does_not_block_the_device() {
    let mut h = Harness::new(MRG);
    let bufs = h.rx_buffers(16, 2048);
    h.kick(RXQ);
    // Far more frames than buffers: the device fills what it has, then waits idle.
    let mut sent = 0;
    while h.peer().send(&frame(100, 50)).is_ok() && sent < 2000 {
        sent += 1;
    }
    assert!(sent > 16);
    h.run();
    assert_eq!(h.rxq.take_used(&h.mem).len(), 16);
    // TX still works meanwhile.
    let f = frame(60, 51);
    h.tx_chain(&[(&f, false)]);
    h.kick(TXQ);
    assert_eq!(h.tap_frames(), vec![f]);
    // Each batch of buffers takes the next frames, until the network side is drained.
    let mut delivered = 16;
    while delivered < sent {
        h.rx_buffers(64, 2048);
        h.kick(RXQ);
        let n = h.rxq.take_used(&h.mem).len();
        assert!(n > 0);
        delivered += n;
    }
    assert_eq!(delivered, sent);
    assert_eq!(h.counters().rx_frames, sent as u64);
    assert_eq!(bufs.len(), 16);
}

#[test]
fn the_guest_is_interrupted_for_used_buffers_as_event_idx_asks() {
    let mut h = Harness::new(MRG);
    let f = frame(60, 70);
    h.tx_chain(&[(&f, false)]);
    h.kick(TXQ);
    assert!(h.interrupted(), "TX completion");
    let bufs = h.rx_buffers(8, 2048);
    h.kick(RXQ);
    assert!(!h.interrupted(), "nothing used yet");
    h.network_sends(&f);
    h.run();
    assert!(h.interrupted(), "RX delivery");
    assert_eq!(bufs.len(), 8);

    // With EVENT_IDX the guest asks to hear only once the used index passes `used_event`.
    let mut h = Harness::new(MRG | VIRTIO_RING_F_EVENT_IDX);
    let used_event = h.txq.avail.unchecked_add(4 + 2 * u64::from(QSIZE));
    h.mem.write_obj(3u16, used_event).unwrap();
    for i in 0..4 {
        h.tx_chain(&[(&f, false)]);
        h.kick(TXQ);
        assert_eq!(h.interrupted(), i == 3, "after {} used", i + 1);
    }
}

#[test]
fn a_legacy_driver_is_refused_at_activation() {
    let (ours, _peer) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let mut dev = Net::new(Tap::from_frame_socket(ours).unwrap(), MAC, None).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let (_, q0) = Driver::new(&mem, 0);
    let (_, q1) = Driver::new(&mem, 0x4000);
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let err = dev.activate(mem, vec![q0, q1], irq, MRG).unwrap_err();
    assert!(err.to_string().contains("VIRTIO_F_VERSION_1"), "{err}");
}

#[test]
fn config_space_has_the_mac_link_up_and_the_mtu() {
    let h = Harness::with_mtu(MRG, Some(9000));
    let dev = h.dev.lock().unwrap();
    let cfg = dev.config_space();
    assert_eq!(cfg.len(), 12);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([cfg[8], cfg[9]]), 1, "one queue pair");
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
    assert_ne!(dev.avail_features() & (1 << vn::VIRTIO_NET_F_MTU), 0);
    drop(dev);
    let h = Harness::new(MRG);
    assert_eq!(
        h.dev.lock().unwrap().avail_features() & (1 << vn::VIRTIO_NET_F_MTU),
        0
    );
}

#[test]
fn with_offloads_off_no_checksum_or_segmentation_feature_is_offered() {
    let h = Harness::new(MRG);
    let mut dev = h.dev.lock().unwrap();
    assert_eq!(dev.avail_features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    dev.set_offload(false);
    let offered = dev.avail_features();
    assert_eq!(offered & OFFLOAD_FEATURES, 0);
    assert_ne!(offered & (1 << vn::VIRTIO_NET_F_MRG_RXBUF), 0);
    assert_eq!(
        tap_offloads(offered),
        0,
        "the TAP is told no offloads either"
    );
}

#[test]
fn offered_offloads_come_with_what_they_depend_on() {
    let has = |b: u32| NET_FEATURES & (1 << b) != 0;
    for b in [
        vn::VIRTIO_NET_F_GUEST_TSO4,
        vn::VIRTIO_NET_F_GUEST_TSO6,
        vn::VIRTIO_NET_F_GUEST_UFO,
    ] {
        assert!(has(b) && has(vn::VIRTIO_NET_F_GUEST_CSUM));
    }
    for b in [
        vn::VIRTIO_NET_F_HOST_TSO4,
        vn::VIRTIO_NET_F_HOST_TSO6,
        vn::VIRTIO_NET_F_HOST_UFO,
    ] {
        assert!(has(b) && has(vn::VIRTIO_NET_F_CSUM));
    }
    assert!(!has(vn::VIRTIO_NET_F_CTRL_VQ) && !has(vn::VIRTIO_NET_F_MQ));
}

#[test]
fn tap_offloads_follow_the_guest_features_exactly() {
    let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | (1 << b));
    assert_eq!(tap_offloads(0), 0);
    assert_eq!(
        tap_offloads(f(&[vn::VIRTIO_NET_F_GUEST_CSUM])),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        tap_offloads(f(&[
            vn::VIRTIO_NET_F_GUEST_CSUM,
            vn::VIRTIO_NET_F_GUEST_TSO4,
            vn::VIRTIO_NET_F_GUEST_TSO6,
            vn::VIRTIO_NET_F_GUEST_UFO,
        ])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
    );
    assert_eq!(
        tap_offloads(f(&[
            vn::VIRTIO_NET_F_GUEST_CSUM,
            vn::VIRTIO_NET_F_GUEST_TSO6
        ])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
    // Segmentation without checksum offload would make TUNSETOFFLOAD fail: never asked.
    assert_eq!(tap_offloads(f(&[vn::VIRTIO_NET_F_GUEST_TSO4])), 0);
    // Host-side (TX) offloads are not the TAP's to know.
    assert_eq!(
        tap_offloads(f(&[vn::VIRTIO_NET_F_CSUM, vn::VIRTIO_NET_F_HOST_TSO4])),
        0
    );
}

#[test]
fn the_event_loop_sets_the_offloads_of_each_new_driver() {
    let csum = 1u64 << vn::VIRTIO_NET_F_GUEST_CSUM;
    let tso4 = 1u64 << vn::VIRTIO_NET_F_GUEST_TSO4;
    let mut h = Harness::new(MRG | csum | tso4);
    assert_eq!(
        h.dev.lock().unwrap().offloads(),
        Some(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
    );
    // A driver after a reset takes fewer: the TAP follows.
    h.dev.lock().unwrap().reset();
    let mem = h.mem.clone();
    let (_, q0) = Driver::new(&mem, 0x8000);
    let (_, q1) = Driver::new(&mem, 0xc000);
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    h.dev
        .lock()
        .unwrap()
        .activate(mem, vec![q0, q1], irq, VIRTIO_F_VERSION_1)
        .unwrap();
    h.run();
    assert_eq!(h.dev.lock().unwrap().offloads(), Some(0));
}

#[test]
fn after_a_reset_the_device_serves_a_new_driver() {
    let mut h = Harness::new(MRG);
    h.network_sends(&frame(100, 60));
    h.run();
    h.dev.lock().unwrap().reset();
    h.run();
    let mem = h.mem.clone();
    let (rxq, q0) = Driver::new(&mem, 0x8000);
    let (txq, q1) = Driver::new(&mem, 0xc000);
    h.rxq = rxq;
    h.txq = txq;
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    h.dev
        .lock()
        .unwrap()
        .activate(mem, vec![q0, q1], irq, VIRTIO_F_VERSION_1 | MRG)
        .unwrap();
    h.run();
    let bufs = h.rx_buffers(1, 2048);
    h.kick(RXQ);
    let f = frame(70, 61);
    h.network_sends(&f);
    h.run();
    assert_eq!(h.rxq.take_used(&h.mem), vec![(bufs[0].0, 82)]);
    assert_eq!(h.guest_bytes(bufs[0].1, 82), as_received(&f, 1));
}

/// Run `body` on a thread of its own in a new network namespace, so that no TAP ever
/// appears on the host; returns false (the test is then skipped) where that or
/// /dev/net/tun is not available.
fn in_private_netns(body: fn()) -> bool {
    std::thread::spawn(move || {
        if nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).is_err()
            || !std::path::Path::new("/dev/net/tun").exists()
        {
            eprintln!("skipped: no private network namespace or no /dev/net/tun here");
            return false;
        }
        body();
        true
    })
    .join()
    .unwrap()
}

/// Give interface `name` the IPv4 address `addr` and bring it up (ioctls on an inet socket).
fn link_up_with_address(name: &str, addr: [u8; 4]) {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req[16..18].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    req[20..24].copy_from_slice(&addr);
    // SAFETY: each of these ioctls reads and writes one 40-byte `struct ifreq`, `req`.
    unsafe {
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFADDR, req.as_mut_ptr()), 0);
        req[16..].fill(0);
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, req.as_mut_ptr()), 0);
        let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, req.as_mut_ptr()), 0);
    }
}

const GUEST_OFFLOADS: [u32; 4] = [
    vn::VIRTIO_NET_F_GUEST_CSUM,
    vn::VIRTIO_NET_F_GUEST_TSO4,
    vn::VIRTIO_NET_F_GUEST_TSO6,
    vn::VIRTIO_NET_F_GUEST_UFO,
];

#[test]
fn a_real_tap_takes_every_offload_set_a_guest_may_acknowledge() {
    in_private_netns(|| {
        let tap = Tap::open("brig-net0").unwrap();
        assert_eq!(tap.name(), "brig-net0");
        for mask in 0..16u32 {
            let features = (0..4)
                .filter(|i| mask & (1 << i) != 0)
                .fold(0u64, |acc, i| acc | (1 << GUEST_OFFLOADS[i as usize]));
            let flags = tap_offloads(features);
            if let Err(e) = tap.set_offload(flags) {
                panic!("TUNSETOFFLOAD {flags:#x} (features {features:#x}): {e}");
            }
        }
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int.
        let rc = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut size) };
        assert_eq!((rc, size), (0, 12));
        // The same TAP passed as a descriptor is taken as it is.
        let inherited = Tap::from_fd(tap.as_fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(inherited.name(), "brig-net0");
    });
}

#[test]
fn an_inherited_tap_opened_without_vnet_headers_is_refused() {
    in_private_netns(|| {
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = [0u8; 40];
        req[..9].copy_from_slice(b"brig-net1");
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
        req[16..18].copy_from_slice(&flags.to_ne_bytes());
        let fd = file.as_raw_fd();
        // SAFETY: TUNSETIFF reads and writes one 40-byte `struct ifreq`, `req`.
        let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, req.as_mut_ptr()) };
        assert_eq!(rc, 0);
        match check_tap_fd(fd) {
            Err(TapError::NotTap { reason, .. }) => {
                assert!(reason.contains("without IFF_VNET_HDR"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    });
}

/// An ARP request from the guest (MAC) for `target`, as `sender`.
fn arp_request(sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; NET_HDR_LEN];
    f.extend([0xff; 6]);
    f.extend(MAC);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend(MAC);
    f.extend(sender);
    f.extend([0; 6]);
    f.extend(target);
    f
}

#[test]
fn through_a_real_tap_the_guest_asks_for_a_mac_and_the_host_answers() {
    in_private_netns(|| {
        let tap = Tap::open("brig-net2").unwrap();
        link_up_with_address("brig-net2", [10, 0, 0, 1]);
        let offloads = GUEST_OFFLOADS.iter().fold(0u64, |acc, b| acc | (1 << b));
        let mut h = Harness::with_tap(tap, None, MRG | offloads, None);
        arp_round_trip(&mut h);
    });
}

#[test]
fn the_device_makes_only_the_calls_its_threads_filters_allow() {
    use crate::seccomp::{exit_code_under_filter, ThreadKind};
    in_private_netns(|| {
        let tap = Tap::open("brig-net3").unwrap();
        link_up_with_address("brig-net3", [10, 0, 0, 1]);
        let offloads = GUEST_OFFLOADS.iter().fold(0u64, |acc, b| acc | (1 << b));
        let mut h = Harness::activated(tap, None, MRG | offloads, None);
        // Activation and reset run on a vCPU thread.
        let mem = h.mem.clone();
        let (_, q0) = Driver::new(&mem, 0x8000);
        let (_, q1) = Driver::new(&mem, 0xc000);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let dev = h.dev.clone();
        let code = exit_code_under_filter(ThreadKind::Vcpu, move || {
            let mut dev = dev.lock().unwrap();
            dev.reset();
            let activated = dev.activate(mem, vec![q0, q1], irq, VIRTIO_F_VERSION_1);
            i32::from(activated.is_err())
        });
        assert_eq!(
            code,
            Some(0),
            "activation and reset make only calls a vCPU may make"
        );
        // The event loop (offloads, TX, RX over a real TAP) runs under the net thread's.
        let code = exit_code_under_filter(ThreadKind::Net, || {
            let body = std::panic::AssertUnwindSafe(|| arp_round_trip(&mut h));
            // A failed assertion must not unwind into the forked copy of the test harness.
            i32::from(std::panic::catch_unwind(body).is_err())
        });
        assert_eq!(
            code,
            Some(0),
            "the event loop makes only calls its thread may make"
        );
    });
}

/// The guest asks for 10.0.0.1's MAC through the device; the host kernel's answer comes
/// back into its RX buffers. The device was activated with every guest offload.
fn arp_round_trip(h: &mut Harness) {
    {
        h.run();
        // The event loop set the TAP's offloads to the driver's.
        let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO;
        assert_eq!(h.dev.lock().unwrap().offloads(), Some(all));
        let bufs: std::collections::HashMap<u16, u64> =
            h.rx_buffers(64, 2048).into_iter().collect();
        h.kick(RXQ);
        let request = arp_request([10, 0, 0, 2], [10, 0, 0, 1]);
        h.tx_chain(&[(&request[..20], false), (&request[20..], false)]);
        h.kick(TXQ);
        assert_eq!(h.counters().tx_frames, 1, "{:?}", h.counters());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            h.em.run_with_timeout(100).unwrap();
            for (head, len) in h.rxq.take_used(&h.mem) {
                let got = h.guest_bytes(bufs[&head], len as usize);
                let eth = &got[NET_HDR_LEN..];
                if eth.len() >= 42 && eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                    assert_eq!(&got[10..12], &[1, 0], "num_buffers");
                    assert_eq!(&eth[..6], &MAC, "to the guest");
                    assert_eq!(&eth[28..32], &[10, 0, 0, 1], "10.0.0.1 is at");
                    assert_eq!(&eth[6..12], &eth[22..28]);
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no ARP reply: {:?}",
                h.counters()
            );
        }
    }
}

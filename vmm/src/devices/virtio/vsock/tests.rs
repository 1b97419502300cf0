//! Tests for the vsock device: a fake guest driver writes descriptor chains into guest memory
//! and kicks the queues; host processes are plain Unix sockets; a real `EventManager` runs the
//! device's `process()` until nothing is left to do.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::port_path;
use super::connection::CONN_BUF_ALLOC;
use super::packet::*;
use super::*;

const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 128;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Guest buffers are allocated from here up.
const BUF_BASE: u64 = 0x10_0000;

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

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
    fn new(mem: &GuestMemoryMmap, base: u64) -> (Self, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        let q = mock.create_queue::<Queue>().unwrap();
        let d = Driver {
            desc: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used: mock.used_addr(),
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
    _dir: tempfile::TempDir,
    uds: PathBuf,
    mem: GuestMemoryMmap,
    dev: Arc<Mutex<Vsock>>,
    em: EventManager<Arc<Mutex<Vsock>>>,
    rxq: Driver,
    txq: Driver,
    next_buf: u64,
    rx_bufs: HashMap<u16, u64>,
    rx_outstanding: usize,
    irq: Arc<IrqTrigger>,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let dev = Arc::new(Mutex::new(Vsock::new(GUEST_CID, uds.clone()).unwrap()));
        let mem = guest_memory();
        let (rxq, q0) = Driver::new(&mem, 0);
        let (txq, q1) = Driver::new(&mem, 0x4000);
        let (_, q2) = Driver::new(&mem, 0x8000);
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut em = EventManager::new().unwrap();
        em.add_subscriber(dev.clone());
        dev.lock()
            .unwrap()
            .activate(
                mem.clone(),
                vec![q0, q1, q2],
                irq.clone(),
                VIRTIO_F_VERSION_1,
            )
            .unwrap();
        let mut h = Harness {
            _dir: dir,
            uds,
            mem,
            dev,
            em,
            rxq,
            txq,
            next_buf: BUF_BASE,
            rx_bufs: HashMap::new(),
            rx_outstanding: 0,
            irq,
        };
        h.run();
        h
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

    /// Put a TX chain made of the given (content, device-writable) buffers; returns its head.
    fn tx_chain(&mut self, parts: &[(&[u8], bool)]) -> u16 {
        let mut descs = Vec::new();
        for (content, writable) in parts {
            let at = self.alloc(content.len().max(1));
            self.mem.write_slice(content, GuestAddress(at)).unwrap();
            descs.push((at, u32::try_from(content.len()).unwrap(), *writable));
        }
        self.txq.add_chain(&self.mem, &descs)
    }

    /// The guest sends one packet, header and payload in one descriptor.
    fn send(&mut self, hdr: PacketHeader, data: &[u8]) {
        let mut bytes = hdr.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.tx_chain(&[(&bytes, false)]);
        self.kick(TXQ);
    }

    /// The guest keeps `n` RX buffers of `size` bytes each posted.
    fn give_rx(&mut self, n: usize, size: u32) {
        for _ in self.rx_outstanding..n {
            self.rx_outstanding += 1;
            let at = self.alloc(size as usize);
            let head = self.rxq.add_chain(&self.mem, &[(at, size, true)]);
            self.rx_bufs.insert(head, at);
        }
        self.kick(RXQ);
    }

    /// Packets the device put in the RX queue since the last call.
    fn recv(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.rxq.take_used(&self.mem) {
            self.rx_outstanding -= 1;
            let at = self.rx_bufs[&head];
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
            let hdr = PacketHeader::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(
                hdr.len as usize,
                len as usize - HDR_LEN,
                "used length matches"
            );
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Give RX buffers and collect whatever the device has for the guest.
    fn recv_all(&mut self) -> Vec<(PacketHeader, Vec<u8>)> {
        self.give_rx(8, 4096 + HDR_LEN as u32);
        self.recv()
    }

    /// Let every deadline pass, as the device's timer would after long enough.
    fn expire_deadlines(&mut self) {
        let dev = self.dev.lock().unwrap();
        let mut dev = dev;
        dev.backend.expire(Instant::now() + Duration::from_secs(60));
        dev.wake();
        drop(dev);
        self.run();
    }

    fn connections(&self) -> usize {
        self.dev.lock().unwrap().backend.connection_count()
    }

    /// A guest-initiated connection from guest port `gport` to a listener on host port
    /// `hport`: returns the host's accepted stream.
    fn guest_connect(&mut self, hport: u32, gport: u32) -> UnixStream {
        let listener = UnixListener::bind(port_path(&self.uds, hport)).unwrap();
        self.send(guest_pkt(OP_REQUEST, gport, hport), &[]);
        let got = self.recv_all();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, OP_RESPONSE);
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// A host-initiated connection to guest port `gport`, accepted by the guest: returns
    /// the host stream (after `OK`) and the host-side port.
    fn host_connect(&mut self, gport: u32, guest_buf_alloc: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(format!("CONNECT {gport}\n").as_bytes())
            .unwrap();
        self.run();
        let got = self.recv_all();
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!(req.op, OP_REQUEST);
        let mut resp = guest_pkt(OP_RESPONSE, gport, req.src_port);
        resp.buf_alloc = guest_buf_alloc;
        self.send(resp, &[]);
        let expect = format!("OK {}\n", req.src_port);
        let mut ok = vec![0u8; expect.len()];
        s.read_exact(&mut ok).unwrap();
        assert_eq!(String::from_utf8(ok).unwrap(), expect);
        (s, req.src_port)
    }
}

fn guest_pkt(op: u16, src_port: u32, dst_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn rw(src_port: u32, dst_port: u32, data: &[u8]) -> PacketHeader {
    let mut h = guest_pkt(OP_RW, src_port, dst_port);
    h.len = u32::try_from(data.len()).unwrap();
    h
}

/// Read from a host stream until EOF (or a timeout error).
fn read_to_eof(s: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// The device closed its end: end of stream, or a reset if it left our bytes unread.
fn assert_closed(s: &mut UnixStream) {
    match read_to_eof(s) {
        Ok(v) => assert!(v.is_empty(), "unexpected data {v:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
}

// ---------------------------------------------------------------------------------------
// CONNECT line parsing

#[test]
fn connect_line_parses_ports() {
    assert_eq!(parse_connect_line(b"CONNECT 1234\n"), Ok(1234));
    assert_eq!(parse_connect_line(b"CONNECT 0\n"), Ok(0));
    assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Ok(u32::MAX));
    assert_eq!(parse_connect_line(b"CONNECT 52\r\n"), Ok(52));
}

#[test]
fn connect_line_rejects_garbage() {
    use ConnectLineError::*;
    let long = [b'9'; 40];
    let mut too_long = b"CONNECT ".to_vec();
    too_long.extend_from_slice(&long);
    too_long.push(b'\n');
    for (line, want) in [
        (&b"CONNECT x\n"[..], BadPort),
        (b"CONNECT 99999999999\n", PortOutOfRange),
        (b"CONNECT 4294967296\n", PortOutOfRange),
        (b"CONNECT 1234", MissingNewline),
        (b"", MissingNewline),
        (b"CONNECT \n", BadPort),
        (b"CONNECT +5\n", BadPort),
        (b"CONNECT -5\n", BadPort),
        (b"CONNECT 12 34\n", BadPort),
        (b"connect 5\n", NotConnect),
        (b"OK 5\n", NotConnect),
        (b"\n", NotConnect),
        (&too_long, TooLong),
    ] {
        assert_eq!(parse_connect_line(line), Err(want), "{line:?}");
    }
    // Arbitrary bytes never panic.
    for n in 0..=255u8 {
        let _ = parse_connect_line(&[b'C', n, b'\n', 0xff, n]);
    }
}

// ---------------------------------------------------------------------------------------
// Descriptor chain parsing

fn parse_tx(
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
) -> Result<(PacketHeader, Vec<u8>), ChainError> {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    let mut data = Vec::new();
    read_tx_packet(mem, chain, &mut data).map(|h| (h, data))
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

#[test]
fn tx_parser_accepts_every_layout() {
    let mem = guest_memory();
    let payload: Vec<u8> = (0..100u8).collect();
    let hdr = rw(1025, 1024, &payload);
    let wire = [hdr.to_bytes().to_vec(), payload.clone()].concat();

    // (a) header and data in one descriptor (Linux >= 6.3).
    mem.write_slice(&wire, GuestAddress(0x10_0000)).unwrap();
    let got = parse_tx(&mem, &[desc(0x10_0000, 144, 0)]).unwrap();
    assert_eq!(got, (hdr, payload.clone()));

    // (b) header and data split.
    mem.write_slice(&wire[..44], GuestAddress(0x20_0000))
        .unwrap();
    mem.write_slice(&wire[44..], GuestAddress(0x30_0000))
        .unwrap();
    let got = parse_tx(&mem, &[desc(0x20_0000, 44, 0), desc(0x30_0000, 100, 0)]).unwrap();
    assert_eq!(got, (hdr, payload.clone()));

    // (c) data over several descriptors.
    mem.write_slice(&wire[44..74], GuestAddress(0x40_0000))
        .unwrap();
    mem.write_slice(&wire[74..75], GuestAddress(0x50_0000))
        .unwrap();
    mem.write_slice(&wire[75..], GuestAddress(0x60_0000))
        .unwrap();
    let got = parse_tx(
        &mem,
        &[
            desc(0x20_0000, 44, 0),
            desc(0x40_0000, 30, 0),
            desc(0x50_0000, 1, 0),
            desc(0x60_0000, 69, 0),
        ],
    )
    .unwrap();
    assert_eq!(got, (hdr, payload.clone()));

    // (d) the header itself split, and sharing a descriptor with the first data bytes.
    mem.write_slice(&wire[..20], GuestAddress(0x70_0000))
        .unwrap();
    mem.write_slice(&wire[20..60], GuestAddress(0x80_0000))
        .unwrap();
    mem.write_slice(&wire[60..], GuestAddress(0x90_0000))
        .unwrap();
    let got = parse_tx(
        &mem,
        &[
            desc(0x70_0000, 20, 0),
            desc(0x80_0000, 40, 0),
            desc(0x90_0000, 84, 0),
        ],
    )
    .unwrap();
    assert_eq!(got, (hdr, payload.clone()));

    // Buffers longer than the payload are fine; the extra bytes are ignored.
    let got = parse_tx(&mem, &[desc(0x10_0000, 4000, 0)]).unwrap();
    assert_eq!(got, (hdr, payload));
}

#[test]
fn tx_parser_rejects_malformed_chains() {
    let mem = guest_memory();
    let payload = [7u8; 100];
    let hdr = rw(1025, 1024, &payload);
    mem.write_slice(&hdr.to_bytes(), GuestAddress(0x10_0000))
        .unwrap();
    let mut big = hdr;
    big.len = MAX_PKT_DATA as u32 + 1;
    mem.write_slice(&big.to_bytes(), GuestAddress(0x20_0000))
        .unwrap();
    let end = MEM_SIZE as u64;

    let cases: Vec<(Vec<RawDescriptor>, ChainError)> = vec![
        // Too short for a header, in one descriptor and split.
        (vec![desc(0x10_0000, 43, 0)], ChainError::TooShort),
        (
            vec![desc(0x10_0000, 20, 0), desc(0x10_0014, 10, 0)],
            ChainError::TooShort,
        ),
        // Header fine, payload missing or short.
        (
            vec![desc(0x10_0000, 44, 0)],
            ChainError::LenBeyondChain { len: 100, avail: 0 },
        ),
        (
            vec![desc(0x10_0000, 44, 0), desc(0x30_0000, 50, 0)],
            ChainError::LenBeyondChain {
                len: 100,
                avail: 50,
            },
        ),
        // Outside guest memory, entirely and straddling its end.
        (
            vec![desc(end + 0x1000, 144, 0)],
            ChainError::OutOfBounds {
                addr: end + 0x1000,
                len: 144,
            },
        ),
        (
            vec![desc(end - 20, 144, 0)],
            ChainError::OutOfBounds {
                addr: end - 20,
                len: 144,
            },
        ),
        (
            vec![desc(0x10_0000, 44, 0), desc(u64::MAX - 10, 100, 0)],
            ChainError::OutOfBounds {
                addr: u64::MAX - 10,
                len: 100,
            },
        ),
        // Wrong direction: the device must not read from device-writable buffers.
        (
            vec![desc(0x10_0000, 144, F_WRITE)],
            ChainError::WritableOnTx,
        ),
        (
            vec![desc(0x10_0000, 44, 0), desc(0x30_0000, 100, F_WRITE)],
            ChainError::WritableOnTx,
        ),
        // Zero-length descriptors.
        (
            vec![desc(0x10_0000, 0, 0)],
            ChainError::ZeroLengthDescriptor,
        ),
        (
            vec![desc(0x10_0000, 44, 0), desc(0x30_0000, 0, 0)],
            ChainError::ZeroLengthDescriptor,
        ),
        // A payload length beyond the maximum, whatever the buffers say.
        (
            vec![desc(0x20_0000, 44, 0), desc(0x30_0000, 0x20000, 0)],
            ChainError::Oversized(MAX_PKT_DATA as u32 + 1),
        ),
    ];
    for (descs, want) in cases {
        assert_eq!(
            parse_tx(&mem, &descs).map(|_| ()),
            Err(want.clone()),
            "{want}"
        );
    }
}

fn rx_buffer(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<RxBuffer, ChainError> {
    let q = MockSplitQueue::new(mem, 16);
    RxBuffer::parse(mem, q.build_desc_chain(descs).unwrap())
}

#[test]
fn rx_buffers_are_checked_and_written_across_descriptors() {
    let mem = guest_memory();
    let end = MEM_SIZE as u64;
    for (descs, want) in [
        (vec![desc(0x10_0000, 4096, 0)], ChainError::ReadOnlyOnRx),
        (
            vec![desc(0x10_0000, 44, F_WRITE), desc(0x20_0000, 10, 0)],
            ChainError::ReadOnlyOnRx,
        ),
        (vec![desc(0x10_0000, 43, F_WRITE)], ChainError::TooShort),
        (
            vec![desc(0x10_0000, 0, F_WRITE)],
            ChainError::ZeroLengthDescriptor,
        ),
        (
            vec![desc(end - 8, 4096, F_WRITE)],
            ChainError::OutOfBounds {
                addr: end - 8,
                len: 4096,
            },
        ),
    ] {
        assert_eq!(
            rx_buffer(&mem, &descs).map(|_| ()),
            Err(want.clone()),
            "{want}"
        );
    }

    // Header split over two descriptors, payload over the rest.
    let buf = rx_buffer(
        &mem,
        &[
            desc(0x10_0000, 10, F_WRITE),
            desc(0x20_0000, 40, F_WRITE),
            desc(0x30_0000, 100, F_WRITE),
        ],
    )
    .unwrap();
    assert_eq!(buf.data_capacity(), 150 - HDR_LEN);
    let payload: Vec<u8> = (0..106u8).collect();
    let hdr = rw(1, 2, &payload);
    assert_eq!(
        buf.write(&mem, &hdr, &[0u8; 107]),
        Err(ChainError::RxBufferTooSmall {
            need: 151,
            avail: 150
        })
    );
    assert_eq!(buf.write(&mem, &hdr, &payload), Ok(150));
    let mut wire = [0u8; 150];
    mem.read_slice(&mut wire[..10], GuestAddress(0x10_0000))
        .unwrap();
    mem.read_slice(&mut wire[10..50], GuestAddress(0x20_0000))
        .unwrap();
    mem.read_slice(&mut wire[50..], GuestAddress(0x30_0000))
        .unwrap();
    assert_eq!(
        PacketHeader::from_bytes(wire[..44].try_into().unwrap()),
        hdr
    );
    assert_eq!(&wire[44..], &payload[..]);
}

// ---------------------------------------------------------------------------------------
// The device: guest-initiated connections

#[test]
fn guest_connects_to_a_listening_host_port_and_data_flows_both_ways() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(port_path(&h.uds, 5000)).unwrap();

    // REQUEST with header and (empty) payload split over two descriptors.
    let req = guest_pkt(OP_REQUEST, 1111, 5000);
    h.tx_chain(&[
        (&req.to_bytes()[..30], false),
        (&req.to_bytes()[30..], false),
    ]);
    h.kick(TXQ);
    let got = h.recv_all();
    assert_eq!(got.len(), 1, "{got:?}");
    let (resp, _) = got[0];
    assert_eq!(
        (
            resp.op,
            resp.src_cid,
            resp.dst_cid,
            resp.src_port,
            resp.dst_port,
            resp.type_
        ),
        (OP_RESPONSE, HOST_CID, GUEST_CID, 5000, 1111, TYPE_STREAM)
    );
    assert_eq!(resp.buf_alloc, CONN_BUF_ALLOC);
    assert!(
        h.irq.status() & VIRTIO_MMIO_INT_VRING != 0,
        "the guest was interrupted"
    );
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    // Guest → host, the payload spread over three descriptors.
    let data = b"hello from the guest";
    let hdr = rw(1111, 5000, data);
    h.tx_chain(&[
        (&hdr.to_bytes(), false),
        (&data[..5], false),
        (&data[5..6], false),
        (&data[6..], false),
    ]);
    h.kick(TXQ);
    let mut buf = vec![0u8; data.len()];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, data);

    // Host → guest.
    host.write_all(b"pong").unwrap();
    h.run();
    let got = h.recv_all();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
        (OP_RW, 5000, 1111)
    );
    assert_eq!(got[0].1, b"pong");
    assert_eq!(
        got[0].0.fwd_cnt,
        data.len() as u32,
        "our fwd_cnt counts forwarded bytes"
    );
}

#[test]
fn guest_connection_to_nobody_gets_rst() {
    let mut h = Harness::new();
    h.send(guest_pkt(OP_REQUEST, 1111, 6000), &[]);
    let got = h.recv_all();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
        (OP_RST, 6000, 1111)
    );

    // A socket file with no listener behind it: refused too.
    let path = port_path(&h.uds, 6001);
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    h.send(guest_pkt(OP_REQUEST, 1112, 6001), &[]);
    let got = h.recv_all();
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!(h.connections(), 0);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut h = Harness::new();
    h.send(rw(1111, 7000, b"stray"), b"stray");
    h.send(guest_pkt(OP_SHUTDOWN, 1112, 7000), &[]);
    h.send(guest_pkt(OP_RST, 1113, 7000), &[]); // never answered
    let got = h.recv_all();
    let ops: Vec<_> = got.iter().map(|(p, _)| (p.op, p.dst_port)).collect();
    assert_eq!(ops, vec![(OP_RST, 1111), (OP_RST, 1112)]);
}

#[test]
fn hostile_headers_are_dropped_or_reset() {
    let mut h = Harness::new();
    let _listener = UnixListener::bind(port_path(&h.uds, 5000)).unwrap();
    // Spoofed source CID: dropped without a reply or a connection.
    let mut p = guest_pkt(OP_REQUEST, 1, 5000);
    p.src_cid = 99;
    h.send(p, &[]);
    // Not for the host.
    let mut p = guest_pkt(OP_REQUEST, 2, 5000);
    p.dst_cid = 7;
    h.send(p, &[]);
    assert!(h.recv_all().is_empty());
    // Unsupported socket type and unknown op: reset.
    let mut p = guest_pkt(OP_REQUEST, 3, 5000);
    p.type_ = 2;
    h.send(p, &[]);
    h.send(guest_pkt(0x77, 4, 5000), &[]);
    let ops: Vec<_> = h
        .recv_all()
        .iter()
        .map(|(p, _)| (p.op, p.dst_port))
        .collect();
    assert_eq!(ops, vec![(OP_RST, 3), (OP_RST, 4)]);
    assert_eq!(h.connections(), 0);
}

#[test]
fn malformed_tx_chains_are_returned_unused_and_the_device_keeps_working() {
    let mut h = Harness::new();
    let req = guest_pkt(OP_REQUEST, 1111, 5000).to_bytes();
    let mut big = rw(1111, 5000, &[]);
    big.len = 1 << 20;
    let heads = [
        h.tx_chain(&[(&req[..43], false)]),         // too short
        h.tx_chain(&[(&req, true)]),                // wrong direction
        h.tx_chain(&[(&req, false), (&[], false)]), // zero-length descriptor
        h.tx_chain(&[(&big.to_bytes(), false), (&[0; 64], false)]), // oversized len
        h.txq
            .add_chain(&h.mem, &[(MEM_SIZE as u64 + 4096, 44, false)]), // out of memory
    ];
    h.kick(TXQ);
    let used = h.txq.take_used(&h.mem);
    assert_eq!(used, heads.iter().map(|&hd| (hd, 0)).collect::<Vec<_>>());
    assert!(h.recv_all().is_empty());

    // Still serving.
    let mut host = h.guest_connect(5000, 1111);
    h.send(rw(1111, 5000, b"ok"), b"ok");
    let mut b = [0u8; 2];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ok");
}

// ---------------------------------------------------------------------------------------
// Host-initiated connections

#[test]
fn host_connect_handshake_and_data() {
    let mut h = Harness::new();
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    h.run();
    let got = h.recv_all();
    assert_eq!(got.len(), 1, "{got:?}");
    let req = got[0].0;
    assert_eq!(
        (
            req.op,
            req.src_cid,
            req.dst_cid,
            req.dst_port,
            req.type_,
            req.len
        ),
        (OP_REQUEST, HOST_CID, GUEST_CID, 1234, TYPE_STREAM, 0)
    );
    assert!(req.src_port >= 1 << 30);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);

    h.send(guest_pkt(OP_RESPONSE, 1234, req.src_port), &[]);
    let mut line = vec![0u8; format!("OK {}\n", req.src_port).len()];
    host.read_exact(&mut line).unwrap();
    assert_eq!(line, format!("OK {}\n", req.src_port).as_bytes());

    host.write_all(b"ping").unwrap();
    h.run();
    let got = h.recv_all();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RW, 1234));
    assert_eq!(got[0].1, b"ping");

    h.send(rw(1234, req.src_port, b"pong"), b"pong");
    let mut b = [0u8; 4];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");

    // A second connection gets another host port.
    let (_s2, port2) = h.host_connect(1234, 4096);
    assert_ne!(port2, req.src_port);
}

#[test]
fn host_data_sent_with_the_connect_line_reaches_the_guest_after_response() {
    let mut h = Harness::new();
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 99\nearly bytes").unwrap();
    h.run();
    let got = h.recv_all();
    assert_eq!(got.len(), 1);
    let req = got[0].0;
    h.send(guest_pkt(OP_RESPONSE, 99, req.src_port), &[]);
    let got = h.recv_all();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"early bytes");
}

#[test]
fn guest_rst_to_request_closes_the_host_stream() {
    let mut h = Harness::new();
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    h.run();
    let req = h.recv_all()[0].0;
    h.send(guest_pkt(OP_RST, 1234, req.src_port), &[]);
    assert_eq!(read_to_eof(&mut host).unwrap(), b"");
    assert_eq!(h.connections(), 0);
}

#[test]
fn bad_connect_lines_close_the_host_connection() {
    let mut h = Harness::new();
    let too_long = format!("CONNECT {}\n", "1".repeat(40));
    let cases: [(&[u8], bool); 5] = [
        (too_long.as_bytes(), false),
        (b"CONNECT 12", true), // EOF before the newline
        (b"CONNECT x\n", false),
        (b"CONNECT 99999999999\n", false),
        (&[0xff; 8], true),
    ];
    for (bytes, eof) in cases {
        let mut host = UnixStream::connect(&h.uds).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = host.write_all(bytes);
        if eof {
            host.shutdown(Shutdown::Write).unwrap();
        }
        h.run();
        assert_closed(&mut host);
    }
    assert!(h.recv_all().is_empty(), "no REQUEST reached the guest");
    assert_eq!(h.connections(), 0);

    // A host that connects and says nothing does not block anything...
    let silent = UnixStream::connect(&h.uds).unwrap();
    h.run();
    let (mut host, port) = h.host_connect(5, 4096);
    h.send(rw(5, port, b"x"), b"x");
    let mut b = [0u8; 1];
    host.read_exact(&mut b).unwrap();
    // ... and is dropped when its handshake times out.
    h.expire_deadlines();
    let mut silent = silent;
    silent
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert_eq!(read_to_eof(&mut silent).unwrap(), b"");
}

#[test]
fn unanswered_request_times_out() {
    let mut h = Harness::new();
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    h.run();
    let req = h.recv_all()[0].0;
    h.expire_deadlines();
    assert_eq!(read_to_eof(&mut host).unwrap(), b"");
    let got = h.recv_all();
    assert_eq!((got[0].0.op, got[0].0.src_port), (OP_RST, req.src_port));
}

// ---------------------------------------------------------------------------------------
// Credit

#[test]
fn host_data_respects_the_guest_credit() {
    let mut h = Harness::new();
    let (mut host, port) = h.host_connect(1234, 8);
    host.write_all(b"0123456789abcdefghij").unwrap();
    h.run();
    let got = h.recv_all();
    let data: Vec<u8> = got
        .iter()
        .filter(|(p, _)| p.op == OP_RW)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(
        data, b"01234567",
        "only the guest's 8 bytes of credit were sent"
    );
    assert!(
        got.iter().any(|(p, _)| p.op == OP_CREDIT_REQUEST),
        "{got:?}"
    );
    assert!(h.recv_all().is_empty(), "nothing more without credit");

    let mut upd = guest_pkt(OP_CREDIT_UPDATE, 1234, port);
    upd.buf_alloc = 8;
    upd.fwd_cnt = 8;
    h.send(upd, &[]);
    let got = h.recv_all();
    assert_eq!(
        got.iter().find(|(p, _)| p.op == OP_RW).unwrap().1,
        b"89abcdef"
    );

    upd.fwd_cnt = 16;
    h.send(upd, &[]);
    let got = h.recv_all();
    assert_eq!(got.iter().find(|(p, _)| p.op == OP_RW).unwrap().1, b"ghij");
}

#[test]
fn header_only_rx_buffers_carry_control_packets_and_do_not_stall_payload() {
    let mut h = Harness::new();
    let mut host = UnixStream::connect(&h.uds).unwrap();
    host.write_all(b"CONNECT 1\nabc").unwrap();
    h.run();
    h.give_rx(1, HDR_LEN as u32);
    let got = h.recv();
    assert_eq!(got.len(), 1);
    let req = got[0].0;
    assert_eq!(req.op, OP_REQUEST);
    h.send(guest_pkt(OP_RESPONSE, 1, req.src_port), &[]);
    // Only payload is pending: a header-only buffer is returned empty.
    h.give_rx(1, HDR_LEN as u32);
    assert_eq!(h.rxq.take_used(&h.mem), vec![(h.rxq.next_desc - 1, 0)]);
    h.rx_outstanding -= 1;
    let got = h.recv_all();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, b"abc");
}

#[test]
fn credit_request_is_answered_and_consumption_is_announced() {
    let mut h = Harness::new();
    let mut host = h.guest_connect(5000, 1111);
    h.send(guest_pkt(OP_CREDIT_REQUEST, 1111, 5000), &[]);
    let got = h.recv_all();
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].0.op, got[0].0.buf_alloc, got[0].0.fwd_cnt),
        (OP_CREDIT_UPDATE, CONN_BUF_ALLOC, 0)
    );

    // Once the host consumed more than half our buffer, the guest hears about it unasked.
    let chunk = vec![0x5a; MAX_PKT_DATA];
    let reader = std::thread::spawn(move || {
        let mut total = 0;
        let mut b = vec![0u8; 65536];
        while total < 3 * MAX_PKT_DATA {
            total += host.read(&mut b).unwrap();
        }
        host
    });
    for _ in 0..3 {
        h.send(rw(1111, 5000, &chunk), &chunk);
    }
    let _host = reader.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut updates = Vec::new();
    while updates.is_empty() && Instant::now() < deadline {
        h.run();
        updates = h
            .recv_all()
            .into_iter()
            .filter(|(p, _)| p.op == OP_CREDIT_UPDATE)
            .collect();
    }
    assert!(!updates.is_empty(), "no CREDIT_UPDATE");
    assert!(updates[0].0.fwd_cnt >= CONN_BUF_ALLOC / 2);
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut h = Harness::new();
    let _host = h.guest_connect(5000, 1111); // never reads
    let chunk = vec![1u8; MAX_PKT_DATA];
    let mut rst = false;
    for _ in 0..16 {
        h.send(rw(1111, 5000, &chunk), &chunk);
        if h.recv_all().iter().any(|(p, _)| p.op == OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(rst, "the connection was never reset");
    assert_eq!(h.connections(), 0);
}

// ---------------------------------------------------------------------------------------
// Shutdown and close

#[test]
fn host_half_close_then_guest_shutdown() {
    let mut h = Harness::new();
    let mut host = h.guest_connect(5000, 1111);
    host.write_all(b"last words").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    h.run();
    let got = h.recv_all();
    let ops: Vec<_> = got.iter().map(|(p, _)| (p.op, p.flags)).collect();
    assert_eq!(ops, vec![(OP_RW, 0), (OP_SHUTDOWN, SHUTDOWN_SEND)]);
    // The host can still read what the guest sends after the half close.
    h.send(rw(1111, 5000, b"reply"), b"reply");
    let mut b = [0u8; 5];
    host.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"reply");
    // The guest closes: RST and the host sees end of stream.
    let mut sd = guest_pkt(OP_SHUTDOWN, 1111, 5000);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    let got = h.recv_all();
    assert_eq!(
        got.iter().map(|(p, _)| p.op).collect::<Vec<_>>(),
        vec![OP_RST]
    );
    assert_eq!(read_to_eof(&mut host).unwrap(), b"");
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_close_sends_full_shutdown_and_guest_rst_finishes() {
    let mut h = Harness::new();
    let host = h.guest_connect(5000, 1111);
    drop(host);
    h.run();
    let got = h.recv_all();
    let ops: Vec<_> = got.iter().map(|(p, _)| (p.op, p.flags)).collect();
    assert_eq!(ops, vec![(OP_SHUTDOWN, SHUTDOWN_BOTH)]);
    h.send(guest_pkt(OP_RST, 1111, 5000), &[]);
    assert_eq!(h.connections(), 0);
    assert!(h.recv_all().is_empty());
}

#[test]
fn unanswered_shutdown_times_out() {
    let mut h = Harness::new();
    drop(h.guest_connect(5000, 1111));
    h.run();
    assert_eq!(h.recv_all()[0].0.op, OP_SHUTDOWN);
    h.expire_deadlines();
    assert_eq!(h.recv_all()[0].0.op, OP_RST);
    assert_eq!(h.connections(), 0);
}

#[test]
fn guest_shutdown_send_half_closes_the_host_stream() {
    let mut h = Harness::new();
    let mut host = h.guest_connect(5000, 1111);
    h.send(rw(1111, 5000, b"bye"), b"bye");
    let mut sd = guest_pkt(OP_SHUTDOWN, 1111, 5000);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    assert_eq!(read_to_eof(&mut host).unwrap(), b"bye");
    // The other direction still works.
    host.write_all(b"still here").unwrap();
    h.run();
    let got = h.recv_all();
    assert_eq!(got[0].1, b"still here");
    // Data after SHUTDOWN(SEND) is a protocol violation.
    h.send(rw(1111, 5000, b"more"), b"more");
    assert_eq!(h.recv_all()[0].0.op, OP_RST);
}

#[test]
fn guest_rst_closes_the_host_stream() {
    let mut h = Harness::new();
    let mut host = h.guest_connect(5000, 1111);
    h.send(guest_pkt(OP_RST, 1111, 5000), &[]);
    assert_eq!(read_to_eof(&mut host).unwrap(), b"");
    assert!(h.recv_all().is_empty());
    assert_eq!(h.connections(), 0);
}

#[test]
fn host_stream_write_error_resets_the_connection() {
    let mut h = Harness::new();
    let mut host = h.guest_connect(5000, 1111);
    host.shutdown(Shutdown::Read).unwrap();
    h.send(rw(1111, 5000, b"into the void"), b"into the void");
    let got = h.recv_all();
    assert!(got.iter().any(|(p, _)| p.op == OP_RST), "{got:?}");
    assert_eq!(h.connections(), 0);
    assert_closed(&mut host);
}

// ---------------------------------------------------------------------------------------
// Device lifecycle

#[test]
fn reset_closes_every_connection_but_keeps_listening() {
    let mut h = Harness::new();
    let mut a = h.guest_connect(5000, 1111);
    let (mut b, _) = h.host_connect(1234, 4096);
    h.dev.lock().unwrap().reset();
    h.run();
    assert_eq!(read_to_eof(&mut a).unwrap(), b"");
    assert_eq!(read_to_eof(&mut b).unwrap(), b"");
    assert_eq!(h.connections(), 0);

    // A host connects while the device is reset; the REQUEST waits for the driver.
    let mut c = UnixStream::connect(&h.uds).unwrap();
    c.write_all(b"CONNECT 77\n").unwrap();
    h.run();
    let mem = h.mem.clone();
    let (rxq, q0) = Driver::new(&mem, 0x10000);
    let (txq, q1) = Driver::new(&mem, 0x14000);
    let (_, q2) = Driver::new(&mem, 0x18000);
    h.rxq = rxq;
    h.txq = txq;
    h.dev
        .lock()
        .unwrap()
        .activate(
            mem,
            vec![q0, q1, q2],
            h.irq.clone(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
        )
        .unwrap();
    h.run();
    let got = h.recv_all();
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_REQUEST, 77));
}

#[test]
fn activate_checks_the_queues() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(GUEST_CID, dir.path().join("v.sock")).unwrap();
    let mem = guest_memory();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let (_, q0) = Driver::new(&mem, 0);
    assert!(matches!(
        dev.activate(mem.clone(), vec![q0], irq.clone(), VIRTIO_F_VERSION_1),
        Err(ActivateError::QueueCount { got: 1, want: 3 })
    ));
    let (_, q0) = Driver::new(&mem, 0);
    let (_, q1) = Driver::new(&mem, 0x4000);
    let not_ready = Queue::new(QSIZE).unwrap();
    assert!(matches!(
        dev.activate(mem, vec![q0, q1, not_ready], irq, VIRTIO_F_VERSION_1),
        Err(ActivateError::InvalidQueue(2))
    ));
}

#[test]
fn identity_features_and_config_space() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Vsock::new(0x1_2345_6789 & 0xffff_fff0, dir.path().join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(dev.queue_events().len(), 3);
    assert_eq!(
        dev.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    );
    assert_eq!(dev.config_space(), dev.guest_cid().to_le_bytes());
}

#[test]
fn new_refuses_bad_cids_and_paths_in_use() {
    let dir = tempfile::tempdir().unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let e = Vsock::new(cid, dir.path().join("a.sock")).unwrap_err();
        assert!(matches!(e, VsockError::InvalidCid(c) if c == cid));
    }
    let path = dir.path().join("b.sock");
    std::fs::write(&path, b"stale").unwrap();
    let e = Vsock::new(3, path.clone()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "vsock socket path {} is in use (another VMM running?) or stale: remove it",
            path.display()
        )
    );
    let e = Vsock::new(3, dir.path().join("no/such/dir/c.sock")).unwrap_err();
    assert!(matches!(e, VsockError::Bind { .. }), "{e}");
}

#[test]
fn drop_removes_only_our_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let dev = Vsock::new(3, path.clone()).unwrap();
    assert!(path.exists());
    drop(dev);
    assert!(!path.exists());

    // Someone replaced the socket file after us: leave theirs alone.
    let dev = Vsock::new(3, path.clone()).unwrap();
    std::fs::remove_file(&path).unwrap();
    let _theirs = UnixListener::bind(&path).unwrap();
    drop(dev);
    assert!(path.exists());
}

//! `brig-stress-guest`: a hostile guest for brig-vmm's tests (issue 8). A freestanding PVH
//! kernel, not Linux: Linux's drivers only send well-formed chains, and a Brig guest's
//! userspace cannot reach a virtqueue. It
//!
//! 1. writes `stress.console_kib` KiB (default 100 MiB) to its console;
//! 2. brings up every virtio device it finds and sends `stress.chains` (default 100 000)
//!    malformed descriptor chains, spread over them: out of guest memory, overflowing,
//!    empty, in the wrong direction, looping, with an impossible `next` or head, indirect
//!    without the feature, too short for the device's header, and well-sized but full of
//!    nonsense; a device that stops returning chains is reset and brought up again, as a
//!    driver may do at any time;
//! 3. then checks that each device still serves a good request: a vsock connection to host
//!    port `stress.port` (default 7000) that carries one line, a FUSE_INIT answered by the
//!    file server, a free page report and a network frame taken;
//! 4. prints one summary line (`brig-stress: done …`) and resets the VM.
//!
//! The test (`tests/e2e/tests/hostile.rs`) checks the host side: capped files, the line on
//! the vsock connection, the summary, the VMM's memory.

#![no_std]
#![no_main]
// memcpy and friends below must not be compiled into calls to themselves.
#![no_builtins]

mod entry;
mod port;
mod virtio;

use virtio::{Desc, Device, DESC_INDIRECT, DESC_NEXT, DESC_WRITE, QUEUE_SIZE};

const ID_NET: u32 = 1;
const ID_BALLOON: u32 = 5;
const ID_VSOCK: u32 = 19;
const ID_FS: u32 = 26;

/// How long to wait for a device to return what it was given (TSC cycles, about a second
/// at the TSC rates of today's hosts; the lab's emulation is slow, the TSC is not).
const PATIENCE: u64 = 3_000_000_000;
/// How long a good request may take before the device counts as dead: generous, because
/// the lab's L1 can stall for half a minute while the TSC runs on.
const LIVENESS: u64 = 100 * PATIENCE;
/// Chains offered per notification.
const BATCH: u16 = 8;

/// The `hvm_start_info` fields this program reads.
const START_INFO_MAGIC: u32 = 0x336e_c578;

struct Options {
    console_kib: u64,
    chains: u64,
    port: u32,
}

fn options(start_info: u64) -> Options {
    let mut opts = Options {
        console_kib: 100 << 10,
        chains: 100_000,
        port: 7000,
    };
    let mut magic = [0u8; 4];
    virtio::peek(start_info, &mut magic);
    if u32::from_le_bytes(magic) != START_INFO_MAGIC {
        say!("brig-stress: no PVH start info; using defaults");
        return opts;
    }
    let mut addr = [0u8; 8];
    virtio::peek(start_info + 24, &mut addr);
    let cmdline = u64::from_le_bytes(addr);
    let mut buf = [0u8; 2048];
    virtio::peek(cmdline, &mut buf);
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    for word in buf[..len].split(|&b| b == b' ') {
        let Some(eq) = word.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&word[..eq], number(&word[eq + 1..]));
        match (key, value) {
            (b"stress.console_kib", Some(v)) => opts.console_kib = v,
            (b"stress.chains", Some(v)) => opts.chains = v,
            (b"stress.port", Some(v)) => opts.port = v as u32,
            _ => {}
        }
    }
    opts
}

fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit()
            .then(|| n.wrapping_mul(10).wrapping_add(u64::from(d - b'0')))
    })
}

/// A page of console lines; each chunk is numbered so that the host can tell the newest.
#[repr(align(4096))]
struct Page([u8; 4096]);

static mut FLOOD: Page = Page([0; 4096]);

fn flood_console(kib: u64) {
    const LINE: usize = 64;
    // SAFETY: one thread; nothing else touches FLOOD.
    let page = unsafe { &mut *core::ptr::addr_of_mut!(FLOOD) };
    for (i, line) in page.0.chunks_mut(LINE).enumerate() {
        line.fill(b'.');
        line[..18].copy_from_slice(b"brig-stress flood ");
        line[LINE - 4] = b'0' + (i / 10) as u8;
        line[LINE - 3] = b'0' + (i % 10) as u8;
        line[LINE - 2] = b'!';
        line[LINE - 1] = b'\n';
    }
    let chunks = kib.div_ceil(4);
    for chunk in 0..chunks {
        // The chunk number in the first ten columns after the prefix, in every line.
        let mut n = chunk;
        let mut digits = [b'0'; 10];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        for line in page.0.chunks_mut(LINE) {
            line[18..28].copy_from_slice(&digits);
        }
        port::console_write(&page.0);
    }
    say!(
        "brig-stress: console flood done, {} KiB in {} chunks",
        chunks * 4,
        chunks
    );
}

/// A tiny deterministic generator for the nonsense.
struct Rng(u64);

impl Rng {
    /// Fill `len` bytes of guest memory at `addr` with nonsense.
    fn scribble(&mut self, addr: u64, len: usize) {
        let mut junk = [0u8; 128];
        let len = len.min(junk.len());
        for b in junk[..len].iter_mut() {
            *b = self.next() as u8;
        }
        virtio::poke(addr, &junk[..len]);
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// What a device expects on the queue attacked: the header's size and whether the device
/// writes its buffers (else reads them).
#[derive(Clone, Copy)]
struct Target {
    queue: usize,
    header: u32,
    device_writes: bool,
    takes: Takes,
}

/// When the device takes what is offered on a queue.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Takes {
    /// At once (TX and request queues).
    AtOnce,
    /// When it has something for the guest: vsock RX, made to answer a connection request
    /// to a port nobody listens on.
    WhenProvoked,
    /// Only when the host has data (net RX on an idle TAP): the buffers are offered, then
    /// the device is reset.
    Never,
}

const fn target(queue: usize, header: u32, device_writes: bool, takes: Takes) -> Target {
    Target {
        queue,
        header,
        device_writes,
        takes,
    }
}

/// Each device's queues attacked: the first gets three quarters of the device's chains.
/// vsock: TX (44-byte header), then RX.
const VSOCK_TARGETS: [Target; 2] = [
    target(1, 44, false, Takes::AtOnce),
    target(0, 44, true, Takes::WhenProvoked),
];
/// virtio-fs: the request queue (40-byte FUSE header), then the high-priority queue.
const FS_TARGETS: [Target; 2] = [
    target(1, 40, false, Takes::AtOnce),
    target(0, 40, false, Takes::AtOnce),
];
/// The balloon: free page reports (whole pages), then the inflate queue (page numbers).
const BALLOON_TARGETS: [Target; 2] = [
    target(2, 4096, true, Takes::AtOnce),
    target(0, 4, false, Takes::AtOnce),
];
/// virtio-net: TX (12-byte header), then RX.
const NET_TARGETS: [Target; 2] = [
    target(1, 12, false, Takes::AtOnce),
    target(0, 12, true, Takes::Never),
];
/// `VIRTIO_BALLOON_F_REPORTING`: the reporting queue exists.
const BALLOON_F_REPORTING: u64 = 1 << 5;

#[derive(Default)]
struct Tally {
    sent: u64,
    returned: u64,
    resets: u64,
    failed_resets: u64,
}

/// A descriptor.
const fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc {
        addr,
        len,
        flags,
        next,
    }
}

/// Lay malformed chain number `n` into the queue and offer it.
fn offer_malformed(dev: &mut Device, t: Target, n: u64, rng: &mut Rng) {
    let q = dev.queue(t.queue);
    // Two descriptors per chain, at slots 2k and 2k+1.
    let head = ((n % u64::from(QUEUE_SIZE / 2)) * 2) as u16;
    let buf = q.buffer(head);
    let dir = if t.device_writes { DESC_WRITE } else { 0 };
    let wrong = if t.device_writes { 0 } else { DESC_WRITE };
    let mut offer_head = head;
    match n % 12 {
        // Beyond guest RAM (below the MMIO windows: nothing there).
        0 => q.set_desc(head, desc(0xc000_0000, 4096, dir, 0)),
        // Wraps around the address space.
        1 => q.set_desc(head, desc(u64::MAX - 15, 4096, dir, 0)),
        // Empty.
        2 => q.set_desc(head, desc(buf, 0, dir, 0)),
        // The wrong direction.
        3 => q.set_desc(head, desc(buf, 4096, wrong, 0)),
        // `next` past the table.
        4 => q.set_desc(head, desc(buf, t.header, dir | DESC_NEXT, 0x7fff)),
        // Two descriptors that point at each other.
        5 => {
            q.set_desc(head, desc(buf, 8, dir | DESC_NEXT, head + 1));
            q.set_desc(head + 1, desc(buf + 8, 8, dir | DESC_NEXT, head));
        }
        // Indirect (not negotiated), its table out of RAM and of a size no table has.
        6 => q.set_desc(head, desc(0xbfff_f000, 17, DESC_INDIRECT, 0)),
        // Shorter than the header.
        7 => q.set_desc(head, desc(buf, t.header / 3 + 1, dir, 0)),
        // A header's worth of nonsense, then a second descriptor in the wrong direction.
        8 => {
            rng.scribble(buf, 64);
            q.set_desc(head, desc(buf, t.header, dir | DESC_NEXT, head + 1));
            q.set_desc(head + 1, desc(buf + 64, 64, wrong, 0));
        }
        // Page-aligned but not whole pages, inside RAM (a bad free page report too).
        9 => q.set_desc(head, desc(64 << 20, 4095, dir, 0)),
        // Right size and direction, every byte nonsense (huge lengths, unknown operations).
        10 => {
            rng.scribble(buf, 128);
            q.set_desc(head, desc(buf, 128.max(t.header), dir, 0));
        }
        // A head the table does not have (rarely: the device may give up on the queue).
        _ if n % 1200 == 11 => offer_head = QUEUE_SIZE + 3,
        // A one-byte descriptor in the wrong direction that chains to itself.
        _ => q.set_desc(head, desc(buf, 1, wrong | DESC_NEXT, head)),
    }
    q.offer(offer_head);
}

/// Send `count` malformed chains to one queue of `dev`, in batches, waiting for the device
/// to return each batch (or resetting it when it does not).
fn attack(dev: &mut Device, t: Target, count: u64, rng: &mut Rng, tally: &mut Tally) {
    let start = port::rdtsc();
    let mut mine = Tally::default();
    // Chains not returned, by kind (see `offer_malformed`).
    let mut missing = [0u32; 12];
    let mut n = 0;
    while n < count {
        let batch = u64::from(BATCH).min(count - n);
        for i in 0..batch {
            offer_malformed(dev, t, n + i, rng);
        }
        dev.notify(t.queue);
        // A head past the table stops the queue until a reset: no point waiting long.
        let bad_head = (n..n + batch).any(|k| k % 1200 == 11);
        let drained = match t.takes {
            Takes::AtOnce => dev.drain(t.queue, if bad_head { PATIENCE / 20 } else { PATIENCE }),
            Takes::WhenProvoked => {
                vsock_send(dev, &vsock_header(4000, 1, OP_REQUEST, 0), &[]);
                dev.drain(t.queue, PATIENCE / 100);
                false
            }
            Takes::Never => false,
        };
        let mut back = [false; QUEUE_SIZE as usize];
        while let Some((id, _)) = dev.queue(t.queue).next_used() {
            mine.returned += 1;
            if let Some(b) = back.get_mut(id as usize) {
                *b = true;
            }
        }
        if t.takes == Takes::AtOnce {
            for i in 0..batch {
                let head = (((n + i) % u64::from(QUEUE_SIZE / 2)) * 2) as usize;
                if !back[head] {
                    missing[((n + i) % 12) as usize] += 1;
                }
            }
        }
        mine.sent += batch;
        n += batch;
        if !drained {
            // RX buffers the device did not need, or a queue it gave up on: start afresh.
            mine.resets += 1;
            if !dev.restart() {
                mine.failed_resets += 1;
                break;
            }
        }
    }
    say!(
        "brig-stress: device {} queue {}: sent={} returned={} resets={} cycles={} missing by kind={:?}",
        dev.id,
        t.queue,
        mine.sent,
        mine.returned,
        mine.resets,
        port::rdtsc().wrapping_sub(start),
        missing
    );
    tally.sent += mine.sent;
    tally.returned += mine.returned;
    tally.resets += mine.resets;
    tally.failed_resets += mine.failed_resets;
}

/// A vsock packet header.
fn vsock_header(src_port: u32, dst_port: u32, op: u16, len: u32) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[0..8].copy_from_slice(&3u64.to_le_bytes()); // our CID
    h[8..16].copy_from_slice(&2u64.to_le_bytes()); // the host
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    h
}

const VSOCK_RX: usize = 0;
const VSOCK_TX: usize = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RW: u16 = 5;

/// Send one packet on the vsock TX queue and wait for it to be taken.
fn vsock_send(dev: &mut Device, header: &[u8; 44], payload: &[u8]) -> bool {
    let q = dev.queue(VSOCK_TX);
    let buf = q.buffer(0);
    virtio::poke(buf, header);
    virtio::poke(buf + 44, payload);
    let len = 44 + payload.len() as u32;
    q.set_desc(0, desc(buf, len, 0, 0));
    q.offer(0);
    dev.notify(VSOCK_TX);
    dev.drain(VSOCK_TX, LIVENESS)
}

/// After the attack, a good connection to host port `port` that carries one line.
fn vsock_alive(dev: &mut Device, port: u32, line: &[u8]) -> Result<(), &'static str> {
    // RX buffers for the host's answers.
    let rx = dev.queue(VSOCK_RX);
    for i in 0..QUEUE_SIZE {
        rx.set_desc(i, desc(rx.buffer(i), 4096, DESC_WRITE, 0));
        rx.offer(i);
    }
    dev.notify(VSOCK_RX);
    const LOCAL: u32 = 4321;
    if !vsock_send(dev, &vsock_header(LOCAL, port, OP_REQUEST, 0), &[]) {
        return Err("the request was not taken");
    }
    let start = port::rdtsc();
    loop {
        let rx = dev.queue(VSOCK_RX);
        if let Some((id, _len)) = rx.next_used() {
            let mut h = [0u8; 44];
            virtio::peek(rx.buffer(id as u16), &mut h);
            let op = u16::from_le_bytes([h[30], h[31]]);
            let dst = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
            // Give the buffer back.
            rx.offer(id as u16);
            dev.notify(VSOCK_RX);
            if dst == LOCAL && op == OP_RESPONSE {
                break;
            }
            if dst == LOCAL && op != OP_RESPONSE {
                return Err("the host refused the connection");
            }
        }
        if port::rdtsc().wrapping_sub(start) > LIVENESS {
            return Err("no answer to the request");
        }
        core::hint::spin_loop();
    }
    if !vsock_send(
        dev,
        &vsock_header(LOCAL, port, OP_RW, line.len() as u32),
        line,
    ) {
        return Err("the data was not taken");
    }
    Ok(())
}

/// After the attack, a FUSE_INIT the file server answers without an error.
fn fs_alive(dev: &mut Device) -> Result<(), &'static str> {
    let q = dev.queue(1);
    let (inb, outb) = (q.buffer(0), q.buffer(1));
    let mut req = [0u8; 56];
    req[0..4].copy_from_slice(&56u32.to_le_bytes()); // len
    req[4..8].copy_from_slice(&26u32.to_le_bytes()); // FUSE_INIT
    req[8..16].copy_from_slice(&77u64.to_le_bytes()); // unique
    req[40..44].copy_from_slice(&7u32.to_le_bytes()); // major
    req[44..48].copy_from_slice(&31u32.to_le_bytes()); // minor
    virtio::poke(inb, &req);
    virtio::poke(outb, &[0xffu8; 16]);
    q.set_desc(0, desc(inb, 56, DESC_NEXT, 1));
    q.set_desc(1, desc(outb, 4096, DESC_WRITE, 0));
    q.offer(0);
    dev.notify(1);
    if !dev.drain(1, LIVENESS) {
        return Err("FUSE_INIT was not answered");
    }
    let mut out = [0u8; 16];
    virtio::peek(outb, &mut out);
    let error = i32::from_le_bytes([out[4], out[5], out[6], out[7]]);
    let unique = u64::from_le_bytes([
        out[8], out[9], out[10], out[11], out[12], out[13], out[14], out[15],
    ]);
    if unique != 77 || error != 0 {
        return Err("FUSE_INIT failed");
    }
    Ok(())
}

/// Offer one good chain (`d`) on queue `q` and wait for the device to take it.
fn one_good_chain(
    dev: &mut Device,
    q: usize,
    d: Desc,
    refused: &'static str,
) -> Result<(), &'static str> {
    dev.queue(q).set_desc(0, d);
    dev.queue(q).offer(0);
    dev.notify(q);
    if dev.drain(q, LIVENESS) {
        Ok(())
    } else {
        Err(refused)
    }
}

/// After the attack, one good free page report (2 MiB this program never touches).
fn balloon_alive(dev: &mut Device) -> Result<(), &'static str> {
    one_good_chain(
        dev,
        2,
        desc(96 << 20, 2 << 20, DESC_WRITE, 0),
        "the report was not taken",
    )
}

/// After the attack, one good frame (a broadcast of the local experimental ethertype).
fn net_alive(dev: &mut Device) -> Result<(), &'static str> {
    let buf = dev.queue(1).buffer(0);
    let mut frame = [0u8; 12 + 60];
    frame[12..18].fill(0xff); // destination: broadcast
    frame[18..24].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x42]);
    frame[24..26].copy_from_slice(&[0x88, 0xb5]);
    virtio::poke(buf, &frame);
    one_good_chain(
        dev,
        1,
        desc(buf, frame.len() as u32, 0, 0),
        "the frame was not taken",
    )
}

fn verdict(r: Result<(), &'static str>) -> &'static str {
    match r {
        Ok(()) => "ok",
        Err(e) => e,
    }
}

#[no_mangle]
extern "C" fn stress_main(start_info: u32) -> ! {
    let opts = options(u64::from(start_info));
    say!(
        "brig-stress: start console_kib={} chains={} port={}",
        opts.console_kib,
        opts.chains,
        opts.port
    );
    flood_console(opts.console_kib);

    // Every device, with what its attacked queues expect.
    let mut devices: [Option<(Device, &'static [Target])>; 8] = Default::default();
    let mut found = 0;
    for slot in 0..virtio::MMIO_WINDOWS {
        let Some(id) = virtio::probe(slot) else {
            continue;
        };
        let (features, queues, targets): (u64, u32, &'static [Target]) = match id {
            ID_VSOCK => (0, 3, &VSOCK_TARGETS),
            ID_FS => (0, 2, &FS_TARGETS),
            ID_BALLOON => (BALLOON_F_REPORTING, 3, &BALLOON_TARGETS),
            ID_NET => (0, 2, &NET_TARGETS),
            _ => continue,
        };
        match Device::init(slot, features, queues) {
            Some(dev) if found < devices.len() => {
                say!("brig-stress: device {} in window {}", id, slot);
                devices[found] = Some((dev, targets));
                found += 1;
            }
            _ => say!(
                "brig-stress: device {} in window {} refused to start",
                id,
                slot
            ),
        }
    }

    // The chains, spread evenly: the first target of each device gets three quarters.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut tally = Tally::default();
    let per_device = if found == 0 {
        0
    } else {
        opts.chains / found as u64
    };
    for (i, (dev, targets)) in devices.iter_mut().flatten().enumerate() {
        let share = if i + 1 == found {
            opts.chains - per_device * (found as u64 - 1)
        } else {
            per_device
        };
        let main = share - share / 4;
        attack(dev, targets[0], main, &mut rng, &mut tally);
        attack(dev, targets[1], share - main, &mut rng, &mut tally);
    }
    say!(
        "brig-stress: chains sent={} returned={} resets={} failed_resets={}",
        tally.sent,
        tally.returned,
        tally.resets,
        tally.failed_resets
    );

    // Each device still serves.
    let (mut vsock, mut fs, mut balloon, mut net) = ("absent", "absent", "absent", "absent");
    let mut line = port::Line::new();
    let _ = core::fmt::Write::write_fmt(
        &mut line,
        format_args!("brig-stress alive after {} malformed chains\n", tally.sent),
    );
    for (dev, _) in devices.iter_mut().flatten() {
        // A fresh start first: the attack may have left a queue the device gave up on.
        let result = if dev.restart() {
            match dev.id {
                ID_VSOCK => vsock_alive(dev, opts.port, line.bytes()),
                ID_FS => fs_alive(dev),
                ID_BALLOON => balloon_alive(dev),
                _ => net_alive(dev),
            }
        } else {
            Err("the device refused a fresh start")
        };
        match dev.id {
            ID_VSOCK => vsock = verdict(result),
            ID_FS => fs = verdict(result),
            ID_BALLOON => balloon = verdict(result),
            _ => net = verdict(result),
        }
    }
    say!(
        "brig-stress: done chains={} vsock={} fs={} balloon={} net={}",
        tally.sent,
        vsock,
        fs,
        balloon,
        net
    );
    port::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("brig-stress: panic: {}", info);
    port::reset()
}

// `core` calls these; no libc provides them here.

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller passes `n` valid bytes at each pointer, not overlapping.
        unsafe { *dst.add(i) = *src.add(i) };
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) < (src as usize) {
        for i in 0..n {
            // SAFETY: the caller passes `n` valid bytes at each pointer; copying upwards
            // is safe when the destination starts below the source.
            unsafe { *dst.add(i) = *src.add(i) };
        }
    } else {
        for i in (0..n).rev() {
            // SAFETY: as above, copying downwards.
            unsafe { *dst.add(i) = *src.add(i) };
        }
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, value: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: the caller passes `n` valid bytes at `dst`.
        unsafe { *dst.add(i) = value as u8 };
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller passes `n` valid bytes at each pointer.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

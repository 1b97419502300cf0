//! Just enough of a virtio-mmio (version 2) driver to be a bad one: bring a device up, lay
//! descriptor chains of any shape into its split queues, notify, and watch the used rings.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// First virtio-mmio window, and the size of each (brig-vmm's layout).
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const MMIO_SIZE: u64 = 0x1000;
/// brig-vmm gives devices IRQs 5 to 23: at most 19 windows.
pub const MMIO_WINDOWS: u64 = 19;

const MAGIC: u32 = 0x7472_6976; // "virt"
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC: u64 = 0x080;
const REG_QUEUE_AVAIL: u64 = 0x090;
const REG_QUEUE_USED: u64 = 0x0a0;

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;

/// Entries per queue the driver uses (every device here offers at least 16).
pub const QUEUE_SIZE: u16 = 16;
/// Each queue's memory: descriptors, avail ring, used ring, then one 4 KiB buffer per entry.
const QUEUE_SPAN: u64 = 0x4000 + QUEUE_SIZE as u64 * 0x1000;
/// Guest RAM for the rings and buffers: 16 MiB and up, 1 MiB per device.
const RING_BASE: u64 = 16 << 20;
const DEVICE_SPAN: u64 = 1 << 20;

fn read32(addr: u64) -> u32 {
    // SAFETY: identity-mapped guest-physical address of a device register or of ring memory
    // this program owns; a volatile read is what the device protocol needs.
    unsafe { read_volatile(addr as *const u32) }
}

fn write32(addr: u64, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { write_volatile(addr as *mut u32, value) }
}

fn read16(addr: u64) -> u16 {
    // SAFETY: as in `read32`.
    unsafe { read_volatile(addr as *const u16) }
}

fn write16(addr: u64, value: u16) {
    // SAFETY: as in `read32`.
    unsafe { write_volatile(addr as *mut u16, value) }
}

fn write64(addr: u64, value: u64) {
    // SAFETY: as in `read32`.
    unsafe { write_volatile(addr as *mut u64, value) }
}

/// Copy `bytes` to guest-physical `addr` (memory this program owns).
pub fn poke(addr: u64, bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        // SAFETY: as in `read32`.
        unsafe { write_volatile((addr + i as u64) as *mut u8, b) }
    }
}

/// Copy from guest-physical `addr` into `out`.
pub fn peek(addr: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: as in `read32`.
        *b = unsafe { read_volatile((addr + i as u64) as *const u8) };
    }
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// One split virtqueue of a device.
pub struct Queue {
    index: u32,
    base: u64,
    avail_idx: u16,
    last_used: u16,
}

impl Queue {
    fn desc_table(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x1000
    }
    fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// Guest-physical address of buffer `slot` (4 KiB each).
    pub fn buffer(&self, slot: u16) -> u64 {
        self.base + 0x4000 + u64::from(slot % QUEUE_SIZE) * 0x1000
    }

    /// Write descriptor `i` of the table (`i` is taken modulo the queue size).
    pub fn set_desc(&self, i: u16, d: Desc) {
        let at = self.desc_table() + u64::from(i % QUEUE_SIZE) * 16;
        write64(at, d.addr);
        write32(at + 8, d.len);
        write16(at + 12, d.flags);
        write16(at + 14, d.next);
    }

    /// Offer the chain whose head is `head` (any value: a hostile driver may name a
    /// descriptor the table does not have).
    pub fn offer(&mut self, head: u16) {
        let slot = self.avail() + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        write16(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        write16(self.avail() + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        fence(Ordering::SeqCst);
        read16(self.used() + 2)
    }

    /// Chains offered and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx())
    }

    /// The next used element not seen yet: (descriptor id, bytes written).
    pub fn next_used(&mut self) -> Option<(u32, u32)> {
        if self.used_idx() == self.last_used {
            return None;
        }
        let elem = self.used() + 4 + u64::from(self.last_used % QUEUE_SIZE) * 8;
        self.last_used = self.last_used.wrapping_add(1);
        Some((read32(elem), read32(elem + 4)))
    }
}

/// A virtio-mmio device this driver brought up.
pub struct Device {
    pub base: u64,
    pub id: u32,
    slot: u64,
    pub features: u64,
    pub queues: [Option<Queue>; 4],
}

/// The device ID in window `slot`, if a virtio-mmio version 2 device is there.
pub fn probe(slot: u64) -> Option<u32> {
    let base = MMIO_BASE + slot * MMIO_SIZE;
    if read32(base + REG_MAGIC) != MAGIC || read32(base + REG_VERSION) != 2 {
        return None;
    }
    match read32(base + REG_DEVICE_ID) {
        0 => None,
        id => Some(id),
    }
}

impl Device {
    /// Bring up the device in window `slot`: reset, negotiate `wanted & offered` features
    /// (VERSION_1 must be offered), set up `queues` queues of [`QUEUE_SIZE`] entries, and set
    /// DRIVER_OK. None if the device refuses.
    pub fn init(slot: u64, wanted: u64, queues: u32) -> Option<Device> {
        let base = MMIO_BASE + slot * MMIO_SIZE;
        let id = read32(base + REG_DEVICE_ID);
        write32(base + REG_STATUS, 0);
        write32(base + REG_STATUS, STATUS_ACKNOWLEDGE);
        write32(base + REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for sel in 0..2u32 {
            write32(base + REG_DEVICE_FEATURES_SEL, sel);
            offered |= u64::from(read32(base + REG_DEVICE_FEATURES)) << (32 * sel);
        }
        if offered & F_VERSION_1 == 0 {
            return None;
        }
        let features = offered & (wanted | F_VERSION_1);
        for sel in 0..2u32 {
            write32(base + REG_DRIVER_FEATURES_SEL, sel);
            write32(base + REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        write32(base + REG_STATUS, status);
        if read32(base + REG_STATUS) & STATUS_FEATURES_OK == 0 {
            return None;
        }
        let mut dev = Device {
            base,
            id,
            slot,
            features,
            queues: [None, None, None, None],
        };
        for q in 0..queues.min(4) {
            write32(base + REG_QUEUE_SEL, q);
            if read32(base + REG_QUEUE_NUM_MAX) < u32::from(QUEUE_SIZE) {
                return None;
            }
            let queue = Queue {
                index: q,
                base: RING_BASE + slot * DEVICE_SPAN + u64::from(q) * QUEUE_SPAN,
                avail_idx: 0,
                last_used: 0,
            };
            // Fresh rings: a reset device starts again at index 0.
            for off in (0..0x3000).step_by(8) {
                write64(queue.base + off, 0);
            }
            write32(base + REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
            for (reg, addr) in [
                (REG_QUEUE_DESC, queue.desc_table()),
                (REG_QUEUE_AVAIL, queue.avail()),
                (REG_QUEUE_USED, queue.used()),
            ] {
                write32(base + reg, addr as u32);
                write32(base + reg + 4, (addr >> 32) as u32);
            }
            write32(base + REG_QUEUE_READY, 1);
            dev.queues[q as usize] = Some(queue);
        }
        write32(base + REG_STATUS, status | STATUS_DRIVER_OK);
        Some(dev)
    }

    /// Reset the device and bring it up again with the same features and queues.
    pub fn restart(&mut self) -> bool {
        let queues = self.queues.iter().filter(|q| q.is_some()).count() as u32;
        match Device::init(self.slot, self.features, queues) {
            Some(dev) => {
                *self = dev;
                true
            }
            None => false,
        }
    }

    /// Queue `q`.
    pub fn queue(&mut self, q: usize) -> &mut Queue {
        self.queues[q].as_mut().expect("queue set up by init")
    }

    /// Tell the device queue `q` has new chains, and acknowledge its interrupts.
    pub fn notify(&mut self, q: usize) {
        let index = self.queue(q).index;
        write32(self.base + REG_QUEUE_NOTIFY, index);
        let pending = read32(self.base + REG_INTERRUPT_STATUS);
        if pending != 0 {
            write32(self.base + REG_INTERRUPT_ACK, pending);
        }
    }

    /// Wait until queue `q` has nothing in flight, for at most `cycles` of the TSC.
    pub fn drain(&mut self, q: usize, cycles: u64) -> bool {
        let start = crate::port::rdtsc();
        loop {
            if self.queue(q).in_flight() == 0 {
                return true;
            }
            if crate::port::rdtsc().wrapping_sub(start) > cycles {
                return false;
            }
            core::hint::spin_loop();
        }
    }
}

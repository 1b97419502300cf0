//! Guest register accesses to a virtio-mmio transport, and queue setup through them: any
//! sequence of reads and writes is served without a panic, and the device is activated at
//! most once between resets, only with queues the transport found valid.
//!
//! Input: 6 bytes per access: kind (bit 0: write; bit 1: config space), register index
//! (times 4 is the offset), value (u32, little endian).
#![no_main]

use std::sync::{Arc, Mutex};

use brig_vmm::devices::virtio::mmio::MmioTransport;
use brig_vmm::devices::virtio::{ActivateError, GuestMemory, IrqTrigger, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x10000;

/// Two queues; checks what the transport hands it.
struct Checking {
    events: Vec<EventFd>,
    mem: GuestMemory,
    active: bool,
}

impl VirtioDevice for Checking {
    fn device_type(&self) -> u32 {
        19
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 256]
    }
    fn avail_features(&self) -> u64 {
        (1 << 32) | (1 << 29)
    }
    fn queue_events(&self) -> &[EventFd] {
        &self.events
    }
    fn config_space(&self) -> Vec<u8> {
        (0..64).collect()
    }
    fn activate(
        &mut self,
        _: GuestMemory,
        queues: Vec<Queue>,
        _: Arc<IrqTrigger>,
        _: u64,
    ) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        for q in &queues {
            assert!(q.is_valid(&self.mem), "activated with an invalid queue");
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.active = false;
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let device = Arc::new(Mutex::new(Checking {
        events: vec![EventFd::new(0).unwrap(), EventFd::new(0).unwrap()],
        mem: mem.clone(),
        active: false,
    }));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(0).unwrap()));
    let mut t = MmioTransport::new(device, mem, irq).unwrap();
    for access in data.chunks_exact(6) {
        let offset = u64::from(access[1]) * 4 + if access[0] & 2 != 0 { 0x100 } else { 0 };
        let value = u32::from_le_bytes(access[2..6].try_into().unwrap());
        if access[0] & 1 != 0 {
            t.write(offset, &value.to_le_bytes());
        } else {
            let mut out = [0u8; 4];
            t.read(offset, &mut out);
        }
    }
});

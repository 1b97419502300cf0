//! The virtio-mmio transport (virtio 1.2 §4.2, version 2 register layout).
//!
//! One transport per device: it answers the driver's register accesses, builds the queues
//! from the addresses the driver writes, and activates the device when the driver sets
//! DRIVER_OK. Queue notifications do not come through here at all: KVM turns writes to
//! `QueueNotify` into the device's queue eventfds (ioeventfds).
//!
//! The transport runs on vCPU threads, and a device's mutex is held by the device's event
//! loop while it does host I/O (a whole FUSE request, for virtio-fs). So that a guest's
//! register access never waits behind that I/O, the transport copies what it serves from the
//! device (identity, offered features, queue sizes, queue eventfds, config space) when it is
//! built, and locks the device only to activate it (DRIVER_OK) and to reset it (status 0),
//! which must be ordered with the event loop anyway.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{GuestMemory, IrqTrigger, VirtioDevice, VIRTIO_MMIO_INT_CONFIG};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4252_4947; // "BRIG"

/// Register offsets.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// virtio-mmio transport state for one device.
pub struct MmioTransport {
    /// Locked only for activation and reset; everything else is served from the copies below.
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    offered_features: u64,
    queue_max_sizes: Vec<u16>,
    /// Duplicates of the device's queue eventfds, for a `QueueNotify` the ioeventfd missed.
    queue_events: Vec<EventFd>,
    config_space: Box<[u8]>,
    mem: GuestMemory,
    irq: Arc<IrqTrigger>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device` in `mem`, raising interrupts through `irq`. It copies the
    /// device's identity, features, queue sizes and config space and duplicates its queue
    /// eventfds (so build it before the VMM's threads are confined: that needs `dup`). Fails
    /// only when an eventfd cannot be duplicated.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
    ) -> std::io::Result<Self> {
        let (device_type, offered_features, queue_max_sizes, queue_events, config_space) = {
            let dev = device.lock().unwrap_or_else(|p| p.into_inner());
            let events = dev
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<std::io::Result<Vec<_>>>()?;
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
                events,
                dev.config_space().into_boxed_slice(),
            )
        };
        let queues = fresh_queues(&queue_max_sizes);
        Ok(Self {
            device,
            device_type,
            offered_features,
            queue_max_sizes,
            queue_events,
            config_space,
            mem,
            irq,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
        })
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues can only be configured before DRIVER_OK.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Guest read of `data.len()` bytes at `offset` in the device window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            read_config(&self.config_space, offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let value = match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.offered_features;
                match self.device_features_select {
                    0 => (features & 0xffff_ffff) as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Guest write of `data` at `offset` in the device window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            // Every device's config space is read-only (see `VirtioDevice::config_space`).
            tracing::debug!(
                "virtio-mmio: ignoring a {}-byte write to the read-only config space at {:#x}",
                data.len(),
                offset - reg::CONFIG
            );
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(
                "virtio-mmio: ignoring {}-byte write at {offset:#x}",
                data.len()
            );
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    return; // features are frozen once FEATURES_OK is set
                }
                let offered = self.offered_features;
                let shift = match self.driver_features_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features =
                    (self.acked_features & !mask) | ((u64::from(v) << shift) & offered);
            }
            reg::QUEUE_SEL => self.queue_select = v,
            reg::QUEUE_NUM => {
                // A size past u16 is invalid, not a smaller size (as a truncation would make it).
                match (self.selected_queue(), u16::try_from(v)) {
                    (Some(q), Ok(size)) => q.set_size(size),
                    (Some(_), Err(_)) => {
                        crate::guest_warn::guest_warn!("virtio-mmio: queue size {v} is past 65535")
                    }
                    (None, _) => {}
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_AVAIL_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_AVAIL_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_USED_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_USED_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd; forward if it reached us anyway.
                if let Some(evt) = self.queue_events.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.set_status(v),
            _ => tracing::debug!("virtio-mmio: ignoring write of {v:#x} at {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    /// The device status as the virtio spec's state machine (2.1, 3.1.1): 0 resets; any
    /// other write may only add bits, and DRIVER_OK activates the device only after
    /// ACKNOWLEDGE, DRIVER and FEATURES_OK. So a device is activated at most once between
    /// resets: a driver that clears DRIVER_OK and sets it again is ignored, not obeyed.
    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & self.status != self.status {
            crate::guest_warn::guest_warn!(
                "virtio-mmio: status {v:#x} clears bits of {:#x} without a reset; ignored",
                self.status
            );
            return;
        }
        let newly_set = v & !self.status;
        let ready = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        if newly_set & status::DRIVER_OK != 0 && v & ready != ready {
            crate::guest_warn::guest_warn!(
                "virtio-mmio: DRIVER_OK in status {v:#x} before ACKNOWLEDGE, DRIVER and FEATURES_OK; ignored"
            );
            return;
        }
        self.status = v;
        if newly_set & status::DRIVER_OK != 0 && v & status::FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if !q.is_valid(&self.mem) {
                crate::guest_warn::guest_warn!(
                    "virtio-mmio: the driver set up an invalid virtqueue {i}"
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                let _ = self.irq.trigger(VIRTIO_MMIO_INT_CONFIG);
                return;
            }
        }
        // The device takes the queues over; the transport keeps fresh ones for the next
        // reset (queue registers are read-only after DRIVER_OK anyway).
        let fresh = fresh_queues(&self.queue_max_sizes);
        let queues = std::mem::replace(&mut self.queues, fresh);
        let result = self
            .device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .activate(
                self.mem.clone(),
                queues,
                self.irq.clone(),
                self.acked_features,
            );
        if let Err(e) = result {
            crate::guest_warn::guest_warn!("virtio-mmio: device activation failed: {e}");
            self.status |= status::DEVICE_NEEDS_RESET;
            let _ = self.irq.trigger(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn reset(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.device().reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.irq.reset();
        for q in &mut self.queues {
            q.reset();
        }
    }
}

/// Unconfigured queues of the given maximum sizes.
fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

/// Copy `config[offset..]` into `data`; bytes past the end of `config` read as 0.
fn read_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::super::ActivateError;
    use super::*;
    use vm_memory::GuestAddress;

    /// A device with one queue that counts its activations and resets.
    struct Counting {
        events: Vec<EventFd>,
        activations: u32,
        resets: u32,
    }

    impl VirtioDevice for Counting {
        fn device_type(&self) -> u32 {
            0x42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn avail_features(&self) -> u64 {
            1 << 32 // VIRTIO_F_VERSION_1
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn config_space(&self) -> Vec<u8> {
            vec![1, 2, 3, 4, 5, 6]
        }
        fn activate(
            &mut self,
            _: GuestMemory,
            _: Vec<Queue>,
            _: Arc<IrqTrigger>,
            _: u64,
        ) -> Result<(), ActivateError> {
            self.activations += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Counting>>) {
        let device = Arc::new(Mutex::new(Counting {
            events: vec![EventFd::new(libc::EFD_NONBLOCK).unwrap()],
            activations: 0,
            resets: 0,
        }));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (
            MmioTransport::new(device.clone(), mem, irq).unwrap(),
            device,
        )
    }

    fn write(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut got = [0u8; 4];
        t.read(offset, &mut got);
        u32::from_le_bytes(got)
    }

    /// How long the busy device in [`finishes_while_the_device_is_busy`] holds its lock
    /// when the access does not finish first.
    const BUSY_FOR: Duration = Duration::from_secs(5);

    /// Run `access` on this thread (a vCPU) while another thread (the device's event loop)
    /// holds the device's mutex, as it does while it serves a request. True when `access`
    /// finished while the lock was held. The other thread lets go after [`BUSY_FOR`] at
    /// most, so a transport that waits for the lock fails the test instead of hanging it.
    fn finishes_while_the_device_is_busy(
        device: &Arc<Mutex<Counting>>,
        access: impl FnOnce(),
    ) -> bool {
        let (locked_tx, locked_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let device = device.clone();
        let event_loop = std::thread::spawn(move || {
            let _busy = device.lock().unwrap();
            locked_tx.send(()).unwrap();
            done_rx.recv_timeout(BUSY_FOR).is_ok()
        });
        locked_rx.recv().unwrap();
        access();
        let _ = done_tx.send(());
        event_loop.join().unwrap()
    }

    #[test]
    fn config_space_reads_do_not_wait_for_a_busy_device() {
        let (mut t, device) = transport();
        let mut got = [0u8; 4];
        let finished = finishes_while_the_device_is_busy(&device, || {
            t.read(reg::CONFIG + 2, &mut got);
        });
        assert!(finished, "the config read waited for the device's lock");
        assert_eq!(got, [3, 4, 5, 6]);
    }

    #[test]
    fn device_id_reads_do_not_wait_for_a_busy_device() {
        let (mut t, device) = transport();
        let mut id = 0;
        let finished = finishes_while_the_device_is_busy(&device, || {
            id = read(&mut t, reg::DEVICE_ID);
        });
        assert!(finished, "the DeviceID read waited for the device's lock");
        assert_eq!(id, 0x42);
    }

    #[test]
    fn feature_negotiation_does_not_wait_for_a_busy_device() {
        let (mut t, device) = transport();
        let mut offered = 0;
        let finished = finishes_while_the_device_is_busy(&device, || {
            write(&mut t, reg::DEVICE_FEATURES_SEL, 1);
            offered = read(&mut t, reg::DEVICE_FEATURES);
            write(&mut t, reg::DRIVER_FEATURES_SEL, 1);
            write(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        });
        assert!(finished, "feature negotiation waited for the device's lock");
        assert_eq!(offered, 1, "VIRTIO_F_VERSION_1 is bit 0 of the high word");
        assert_eq!(t.acked_features, 1 << 32, "only offered bits are taken");
    }

    #[test]
    fn interrupt_status_reads_do_not_wait_for_a_busy_device() {
        let (mut t, device) = transport();
        t.irq.trigger(super::super::VIRTIO_MMIO_INT_VRING).unwrap();
        let mut status = 0;
        let finished = finishes_while_the_device_is_busy(&device, || {
            status = read(&mut t, reg::INTERRUPT_STATUS);
        });
        assert!(
            finished,
            "the InterruptStatus read waited for the device's lock"
        );
        assert_eq!(status, super::super::VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn queue_notify_writes_do_not_wait_for_a_busy_device() {
        let (mut t, device) = transport();
        let finished = finishes_while_the_device_is_busy(&device, || {
            write(&mut t, reg::QUEUE_NOTIFY, 0);
        });
        assert!(
            finished,
            "the QueueNotify write waited for the device's lock"
        );
        assert_eq!(device.lock().unwrap().events[0].read().unwrap(), 1);
        // A queue the device does not have is ignored.
        write(&mut t, reg::QUEUE_NOTIFY, 1);
        assert!(device.lock().unwrap().events[0].read().is_err(), "no kick");
    }

    #[test]
    fn config_space_is_read_only_and_reads_as_zero_past_its_end() {
        let (mut t, _device) = transport();
        t.write(reg::CONFIG, &[9, 9, 9, 9]);
        let mut got = [0xaau8; 8];
        t.read(reg::CONFIG, &mut got);
        assert_eq!(got, [1, 2, 3, 4, 5, 6, 0, 0]);
        let mut got = [0xaau8; 4];
        t.read(u64::MAX, &mut got);
        assert_eq!(got, [0; 4]);
    }

    fn set_up_queue(t: &mut MmioTransport) {
        write(t, reg::QUEUE_SEL, 0);
        write(t, reg::QUEUE_NUM, 16);
        write(t, reg::QUEUE_DESC_LOW, 0x1000);
        write(t, reg::QUEUE_AVAIL_LOW, 0x2000);
        write(t, reg::QUEUE_USED_LOW, 0x3000);
        write(t, reg::QUEUE_READY, 1);
    }

    /// What a Linux driver does from a reset on: status bits one by one, the queue, DRIVER_OK.
    fn start_driver(t: &mut MmioTransport) {
        let s = status::ACKNOWLEDGE | status::DRIVER;
        write(t, reg::STATUS, status::ACKNOWLEDGE);
        write(t, reg::STATUS, s);
        write(t, reg::STATUS, s | status::FEATURES_OK);
        set_up_queue(t);
        write(t, reg::STATUS, s | status::FEATURES_OK | status::DRIVER_OK);
    }

    #[test]
    fn driver_ok_again_without_a_reset_does_not_activate_twice() {
        let (mut t, device) = transport();
        start_driver(&mut t);
        assert_eq!(device.lock().unwrap().activations, 1);
        // Clearing DRIVER_OK and setting it again is not a reset: ignored.
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        write(&mut t, reg::STATUS, s);
        set_up_queue(&mut t);
        write(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(device.lock().unwrap().activations, 1);
        // After a reset the driver may start over.
        write(&mut t, reg::STATUS, 0);
        assert_eq!(device.lock().unwrap().resets, 1);
        start_driver(&mut t);
        assert_eq!(device.lock().unwrap().activations, 2);
    }

    #[test]
    fn driver_ok_before_features_ok_is_ignored() {
        let (mut t, device) = transport();
        set_up_queue(&mut t);
        write(&mut t, reg::STATUS, status::DRIVER_OK);
        write(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(device.lock().unwrap().activations, 0);
        let mut got = [0u8; 4];
        t.read(reg::STATUS, &mut got);
        assert_eq!(u32::from_le_bytes(got) & status::DRIVER_OK, 0);
    }
}

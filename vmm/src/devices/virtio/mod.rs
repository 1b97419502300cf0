//! Virtio devices and the virtio-mmio transport that exposes them to the guest.
//!
//! A device implements [`VirtioDevice`] (what the transport needs: identity, features,
//! config space, activation) and `event_manager::MutEventSubscriber` (its queue
//! notifications and backend file descriptors, served on the VMM's event loop thread).
//! The transport owns nothing device specific; new devices copy the smallest existing one.

pub mod balloon;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// `VIRTIO_F_VERSION_1`: every Brig device is a modern (virtio 1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_IN_ORDER` is not offered; `VIRTIO_RING_F_EVENT_IDX` is bit 29.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Bit in the MMIO `InterruptStatus` register: a used ring was updated.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Bit in the MMIO `InterruptStatus` register: the configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// Guest memory type used by every device.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Errors a device can report when the driver activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("the driver configured {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    /// A queue the device needs is not valid (size, addresses or ready bit).
    #[error("virtqueue {0} is not valid (size, ring addresses or ready bit)")]
    InvalidQueue(usize),
    /// The device could not be activated for a device specific reason.
    #[error("activating the device failed: {0}")]
    Device(String),
}

impl ActivateError {
    /// Brig's devices serve virtio 1.x drivers only: `Err` unless `acked_features` has
    /// `VIRTIO_F_VERSION_1`.
    pub fn unless_version_1(acked_features: u64) -> Result<(), ActivateError> {
        if acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ActivateError::Device(
                "the driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not served)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Tell the guest about new used buffers on `queue` if it wants to hear (EVENT_IDX), or
/// always without EVENT_IDX; `device` names the device in the rate-limited warnings.
pub fn notify_used(queue: &mut Queue, mem: &GuestMemory, irq: &IrqTrigger, device: &str) {
    match queue.needs_notification(mem) {
        Ok(true) => {
            if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_VRING) {
                crate::guest_warn::guest_warn!("{device}: cannot interrupt the guest: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => crate::guest_warn::guest_warn!(
            "{device}: cannot read the queue's notification state: {e}"
        ),
    }
}

/// Interrupt line of one virtio-mmio device: the status register the driver reads plus the
/// eventfd that KVM turns into the device's IRQ (an irqfd).
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    evt: EventFd,
}

impl IrqTrigger {
    /// A trigger that raises its interrupt by writing `evt` (registered as an irqfd).
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Set `bit` (`VIRTIO_MMIO_INT_VRING` or `VIRTIO_MMIO_INT_CONFIG`) and raise the IRQ.
    pub fn trigger(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// The `InterruptStatus` register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged the bits in `bits` (`InterruptACK` register).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clear all pending bits (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd behind the interrupt, for registering the irqfd with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What the virtio-mmio transport needs from a device.
///
/// Queue notifications arrive on `queue_events()` (ioeventfds that KVM signals when the
/// driver writes `QueueNotify`); the device registers them, with its backend file
/// descriptors, on the event loop in its `MutEventSubscriber::init`.
///
/// The transport asks for the device's identity, features, queue sizes, queue eventfds and
/// configuration space once, when it is built, and answers the driver's register accesses
/// from its own copies: a vCPU never waits for the device's mutex, which the device's event
/// loop holds while it does host I/O. So what these methods return must not change after the
/// device is attached. Only [`activate`](Self::activate) and [`reset`](Self::reset) are
/// called on vCPU threads with the device locked.
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each of the device's queues; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// The device configuration space (the bytes at `Config`, offset 0x100, of the MMIO
    /// window). It is fixed for the device's lifetime and read-only: the driver's writes to
    /// it are ignored. A device whose configuration changes at runtime would have to share
    /// it with the transport behind a lock of its own, bump `ConfigGeneration` and raise
    /// `VIRTIO_MMIO_INT_CONFIG`; none of Brig's does.
    fn config_space(&self) -> Vec<u8>;
    /// The driver set DRIVER_OK: start serving `queues` in `mem`, signal through `irq`.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// The driver reset the device (wrote 0 to `Status`). Return to the pre-activation
    /// state, dropping guest-visible state (for vsock: every connection is reset).
    fn reset(&mut self);
}

/// The next descriptor chain the driver made available on `queue`, or `None` when there is
/// none. When the queue looks empty, notifications are re-enabled and the queue is looked at
/// once more: a chain the driver added in between would otherwise wait for a kick that, with
/// notifications suppressed (EVENT_IDX), never comes. An error means the queue is unusable,
/// such as an available index more than a queue's size ahead of the device (which
/// `pop_descriptor_chain` would take for an empty queue while `enable_notification` saw
/// new chains: a guest could keep the device thread spinning between the two forever).
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Option<DescriptorChain<&'m GuestMemory>>, virtio_queue::Error> {
    if let Some(chain) = queue.iter(mem)?.next() {
        return Ok(Some(chain));
    }
    if !queue.enable_notification(mem)? {
        return Ok(None);
    }
    Ok(queue.iter(mem)?.next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    #[test]
    fn an_available_index_past_the_queue_size_is_an_error_not_a_spin() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        // avail->idx (after the 2-byte flags) claims 17 new chains in a ring of 16.
        mem.write_obj(17u16, mock.avail_addr().unchecked_add(2))
            .unwrap();
        // Bounded: the old loop never returned here (the test would hang).
        for _ in 0..3 {
            assert!(matches!(
                next_chain(&mut queue, &mem),
                Err(virtio_queue::Error::InvalidAvailRingIndex)
            ));
        }
        // A driver that puts the index back in range is served again (nothing pending).
        mem.write_obj(0u16, mock.avail_addr().unchecked_add(2))
            .unwrap();
        assert!(matches!(next_chain(&mut queue, &mem), Ok(None)));
    }
}

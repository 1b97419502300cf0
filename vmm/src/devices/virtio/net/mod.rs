//! virtio-net device (virtio spec 1.2 §5.1, device ID 1) with a TAP backend.
//!
//! Two queues, RX (0) and TX (1), no control queue. The guest's frames, each with its
//! 12-byte `virtio_net_hdr_v1`, go to the TAP unchanged (the TAP takes the same header, so
//! checksum and segmentation offloads pass through); frames read from the TAP go into the
//! guest's RX buffers, spread over several of them with `VIRTIO_NET_F_MRG_RXBUF`.
//!
//! Threat model: the guest is hostile. Every chain is bounded and validated (see
//! [`frame`]); a malformed TX chain or a frame the TAP refuses is dropped, counted
//! ([`NetCounters`]), warned about (rate-limited) and its chain returned: the device keeps
//! going and never spins. The TAP's traffic is the pod's own network, not trusted either:
//! a frame that does not fit the guest's buffers is dropped and counted.
//!
//! RX flow control: when the guest has posted no buffers, the device stops watching the TAP
//! (it is removed from the event loop) and keeps the one frame it read; the guest's next RX
//! notification delivers that frame and resumes reading. So a full RX queue costs no CPU and
//! RX never stalls once buffers come back (the bug of Firecracker #1314).
//!
//! Threads: the transport calls [`VirtioDevice::activate`] and [`VirtioDevice::reset`] from
//! vCPU threads, where they only flip state and wake the device's event loop; the loop, in
//! [`MutEventSubscriber::process`], sets the TAP's offloads to the driver's features
//! (`TUNSETOFFLOAD`, before it reads any frame for that driver) and moves frames between the
//! TAP and the queues. Both hold the device's mutex (other register accesses do not: the
//! transport copies the identity, features and config space when it is built).

pub mod frame;
pub mod tap;

#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    next_chain, notify_used, ActivateError, GuestMemory, IrqTrigger, VirtioDevice,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::guest_warn::guest_warn;
use frame::{deliver_rx_frame, send_tx_chain, RxOutcome, RxScratch, TxError, TxScratch};
pub use frame::{FrameError, MAX_FRAME_LEN, NET_HDR_LEN};
pub use tap::{check_tap_fd, Tap, TapError};

/// Virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Queue indices.
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
/// Most TX chains, and RX frames, handled per event-loop wakeup, so that one direction
/// cannot starve the other (or the loop).
const CHAINS_PER_RUN: usize = 256;
/// Smallest MTU the device announces (`VIRTIO_NET_F_MTU`): IPv4's minimum.
pub const MIN_MTU: u16 = 68;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Feature bits this device offers, besides `VIRTIO_NET_F_MTU` (only with an MTU). The
/// offloads respect the spec's dependencies (§5.1.3.1): every `GUEST_TSO*`/`GUEST_UFO`
/// needs `GUEST_CSUM` and every `HOST_TSO*`/`HOST_UFO` needs `CSUM`, both offered.
pub const NET_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | bit(vn::VIRTIO_NET_F_MAC)
    | bit(vn::VIRTIO_NET_F_STATUS)
    | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
    | bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_UFO)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_UFO);

/// The checksum and segmentation offloads among [`NET_FEATURES`]: left out when offloads are
/// turned off (`--net …,offload=off`), so that every frame crosses whole and checksummed.
pub const OFFLOAD_FEATURES: u64 = bit(vn::VIRTIO_NET_F_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
    | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
    | bit(vn::VIRTIO_NET_F_GUEST_UFO)
    | bit(vn::VIRTIO_NET_F_HOST_TSO4)
    | bit(vn::VIRTIO_NET_F_HOST_TSO6)
    | bit(vn::VIRTIO_NET_F_HOST_UFO);

/// The TAP offloads (`TUN_F_*`) that match what the guest acknowledged: what the TAP may
/// hand the guest unchecksummed or unsegmented. Segmentation is only ever set together with
/// checksum offload (the TAP refuses it alone, and the spec makes `GUEST_TSO*`/`GUEST_UFO`
/// depend on `GUEST_CSUM`).
pub fn tap_offloads(acked_features: u64) -> libc::c_uint {
    let has = |b: u32| acked_features & bit(b) != 0;
    if !has(vn::VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(vn::VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(vn::VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(vn::VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// Why the net device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the net device's event file descriptors: {0}")]
    EventFd(io::Error),
}

/// What the device did with the frames it saw (for tests and diagnostics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames the guest sent that reached the TAP.
    pub tx_frames: u64,
    /// Guest TX chains dropped: malformed, or refused by the TAP.
    pub tx_dropped: u64,
    /// Frames from the TAP delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the TAP dropped: they did not fit the guest's buffers, or a buffer was
    /// malformed.
    pub rx_dropped: u64,
}

/// Queues and memory the driver handed over at activation.
struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    irq: Arc<IrqTrigger>,
    mergeable: bool,
}

/// The virtio-net device.
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    mtu: Option<u16>,
    /// Whether checksum and segmentation offloads are offered.
    offload: bool,
    queue_evts: Vec<EventFd>,
    wake_evt: EventFd,
    active: Option<Active>,
    /// The TAP is registered with the event loop.
    tap_watched: bool,
    /// `TUN_F_*` offloads the new driver took, for the event loop to set on the TAP.
    offloads_pending: Option<libc::c_uint>,
    /// The offloads last set on the TAP.
    offloads: Option<libc::c_uint>,
    /// The guest had no RX buffer for `rx_frame`: do not watch the TAP until it posts some.
    rx_waiting: bool,
    /// Bytes of a frame read from the TAP and not yet delivered (0: none).
    rx_pending: usize,
    rx_frame: Vec<u8>,
    rx_scratch: RxScratch,
    tx_scratch: TxScratch,
    counters: NetCounters,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .field("mtu", &self.mtu)
            .field("active", &self.active.is_some())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A net device whose guest side has MAC address `mac` (and is told `mtu`, if given),
    /// and whose frames go through `tap`.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: Option<u16>) -> Result<Net, NetError> {
        let make = || EventFd::new(libc::EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Net {
            tap,
            mac,
            mtu: mtu.map(|m| m.max(MIN_MTU)),
            offload: true,
            queue_evts: vec![make()?, make()?],
            wake_evt: make()?,
            active: None,
            tap_watched: false,
            offloads_pending: None,
            offloads: None,
            rx_waiting: false,
            rx_pending: 0,
            rx_frame: vec![0; MAX_FRAME_LEN],
            rx_scratch: RxScratch::default(),
            tx_scratch: TxScratch::default(),
            counters: NetCounters::default(),
        })
    }

    /// Offer checksum and segmentation offloads (the default) or not. Call it before the
    /// device is attached: the transport reads the offered features once, when it is built.
    pub fn set_offload(&mut self, offload: bool) {
        self.offload = offload;
    }

    /// What happened to frames so far.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// The `TUN_F_*` offloads set on the TAP for the current driver (`None` before the event
    /// loop has set any).
    pub fn offloads(&self) -> Option<libc::c_uint> {
        self.offloads
    }

    /// Set the offloads the driver took on the TAP (on the event loop, before any frame is
    /// read for that driver). A TAP that refuses them is set to none, which every driver
    /// takes: frames then come checksummed and segmented.
    fn apply_offloads(&mut self) {
        let Some(flags) = self.offloads_pending.take() else {
            return;
        };
        let set = match self.tap.set_offload(flags) {
            Ok(()) => Some(flags),
            Err(e) => {
                guest_warn!("virtio-net: the TAP refused offloads {flags:#x} ({e}); using none");
                match self.tap.set_offload(0) {
                    Ok(()) => Some(0),
                    Err(e) => {
                        guest_warn!("virtio-net: the TAP refused to drop its offloads: {e}");
                        None
                    }
                }
            }
        };
        self.offloads = set;
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Ask the event loop to look at the device (after activation or reset, which happen on
    /// vCPU threads).
    fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            guest_warn!("virtio-net: cannot wake the event loop: {e}");
        }
    }

    /// Send every frame the guest queued on TX to the TAP, return the chains.
    fn process_tx(&mut self) {
        let Some(Active {
            mem, queues, irq, ..
        }) = self.active.as_mut()
        else {
            return;
        };
        let Some(q) = queues.get_mut(TXQ) else {
            return;
        };
        let mut used = false;
        for handled in 0.. {
            if handled >= CHAINS_PER_RUN {
                // Let RX and other devices run; come back on the next loop iteration.
                if let Err(e) = self.wake_evt.write(1) {
                    guest_warn!("virtio-net: cannot wake the event loop: {e}");
                }
                break;
            }
            let chain = match next_chain(q, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    guest_warn!("virtio-net: TX queue is unusable: {e}");
                    break;
                }
            };
            let head = chain.head_index();
            match send_tx_chain(mem, chain, self.tap.as_fd(), &mut self.tx_scratch) {
                Ok(_) => self.counters.tx_frames += 1,
                Err(TxError::Chain(e)) => {
                    self.counters.tx_dropped += 1;
                    guest_warn!("virtio-net: dropping a malformed TX chain: {e}");
                }
                Err(TxError::Tap(e)) => {
                    // A full or downed TAP loses the frame, as a real link would.
                    self.counters.tx_dropped += 1;
                    guest_warn!("virtio-net: the TAP did not take a frame, dropped: {e}");
                }
            }
            if let Err(e) = q.add_used(&*mem, head, 0) {
                guest_warn!("virtio-net: cannot return a TX buffer to the guest: {e}");
            }
            used = true;
        }
        if used {
            notify(q, mem, irq);
        }
    }

    /// Move frames from the TAP into the guest's RX buffers until the TAP is empty, the
    /// guest's buffers run out, or the per-run budget is spent.
    fn process_rx(&mut self) {
        let Some(Active {
            mem,
            queues,
            irq,
            mergeable,
        }) = self.active.as_mut()
        else {
            return;
        };
        let Some(q) = queues.get_mut(RXQ) else {
            return;
        };
        let mut used = false;
        for _ in 0..CHAINS_PER_RUN {
            if self.rx_pending == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(0) => break,
                    Ok(n) => self.rx_pending = n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Stop watching a broken TAP (no busy loop on its error); the
                        // guest's next RX notification tries again.
                        guest_warn!("virtio-net: reading the TAP failed: {e}");
                        self.rx_waiting = true;
                        break;
                    }
                }
            }
            let frame = &mut self.rx_frame[..self.rx_pending];
            match deliver_rx_frame(q, mem, frame, *mergeable, &mut self.rx_scratch) {
                Ok(RxOutcome::Delivered(_)) => {
                    self.counters.rx_frames += 1;
                    self.rx_pending = 0;
                    used = true;
                }
                Ok(RxOutcome::NoBuffers) => {
                    self.rx_waiting = true;
                    break;
                }
                Ok(RxOutcome::Dropped(why)) => {
                    self.counters.rx_dropped += 1;
                    self.rx_pending = 0;
                    used = true;
                    guest_warn!("virtio-net: dropping a frame from the TAP: {why}");
                }
                Err(e) => {
                    guest_warn!("virtio-net: RX queue is unusable: {e}");
                    self.rx_waiting = true;
                    break;
                }
            }
        }
        if used {
            notify(q, mem, irq);
        }
    }

    /// Watch the TAP exactly when its frames can go somewhere: the device is active and the
    /// guest is not out of RX buffers.
    fn sync_tap(&mut self, ops: &mut EventOps) {
        let want = self.active.is_some() && !self.rx_waiting;
        if want == self.tap_watched {
            return;
        }
        let events = Events::new_raw(self.tap.as_raw_fd(), EventSet::IN);
        let result = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.tap_watched = want,
            Err(e) => guest_warn!("virtio-net: cannot change the TAP's event registration: {e:?}"),
        }
    }
}

/// Interrupt the guest if it wants to hear about new used buffers.
fn notify(q: &mut Queue, mem: &GuestMemory, irq: &IrqTrigger) {
    notify_used(q, mem, irq, "virtio-net");
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let mtu = if self.mtu.is_some() {
            bit(vn::VIRTIO_NET_F_MTU)
        } else {
            0
        };
        let features = NET_FEATURES | mtu;
        if self.offload {
            features
        } else {
            features & !OFFLOAD_FEATURES
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// `struct virtio_net_config`: mac (6 bytes), status (le16: link up), max_virtqueue_pairs
    /// (le16: 1), mtu (le16).
    /// (le16: 1), mtu (le16). The link is always up. The MAC is writable only by legacy
    /// drivers (virtio 1.x ones use the control queue), so the space is read-only.
    fn config_space(&self) -> Vec<u8> {
        let link_up = u16::try_from(vn::VIRTIO_NET_S_LINK_UP).unwrap_or(1);
        let mut config = Vec::with_capacity(12);
        config.extend_from_slice(&self.mac);
        config.extend_from_slice(&link_up.to_le_bytes());
        config.extend_from_slice(&1u16.to_le_bytes());
        config.extend_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        config
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        // A legacy driver's header is 10 bytes without MRG_RXBUF; the TAP's is set to 12.
        ActivateError::unless_version_1(acked_features)?;
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: QUEUE_SIZES.len(),
            });
        }
        for (i, q) in queues.iter_mut().enumerate() {
            if !q.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
            q.set_event_idx(acked_features & VIRTIO_RING_F_EVENT_IDX != 0);
        }
        // Set by the event loop (the only thread whose filter allows TUNSETOFFLOAD), before
        // it reads a frame for this driver.
        self.offloads_pending = Some(tap_offloads(acked_features));
        self.active = Some(Active {
            mem,
            queues,
            irq,
            mergeable: acked_features & bit(vn::VIRTIO_NET_F_MRG_RXBUF) != 0,
        });
        self.rx_waiting = false;
        self.wake();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = 0;
        self.rx_waiting = false;
        self.wake();
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = self
            .queue_evts
            .iter()
            .chain(std::iter::once(&self.wake_evt))
            .map(|e| e.as_raw_fd());
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                guest_warn!("virtio-net: cannot register with the event loop: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.apply_offloads();
        let fd = events.fd();
        let mut tx = true;
        let mut rx = true;
        if fd == self.queue_evts[RXQ].as_raw_fd() {
            let _ = self.queue_evts[RXQ].read();
            // New buffers: the pending frame may go now, and the TAP is worth reading again.
            self.rx_waiting = false;
            tx = false;
        } else if fd == self.queue_evts[TXQ].as_raw_fd() {
            let _ = self.queue_evts[TXQ].read();
            rx = false;
        } else if fd == self.wake_evt.as_raw_fd() {
            let _ = self.wake_evt.read();
        } else if fd == self.tap.as_raw_fd() {
            tx = false;
        }
        if tx {
            self.process_tx();
        }
        if rx && !self.rx_waiting {
            self.process_rx();
        }
        self.sync_tap(ops);
    }
}

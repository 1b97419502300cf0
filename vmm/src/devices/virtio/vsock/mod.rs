//! virtio-vsock device (virtio spec 1.2 §5.10) with the hybrid Unix-socket backend.
//!
//! The guest talks vsock; the host talks Unix sockets:
//! - a host process connects to the device's socket `uds_path`, writes `CONNECT <port>\n`
//!   and, once the guest accepts, reads `OK <host port>\n`; then the stream carries the data;
//! - a guest connection to host (CID 2) port `P` becomes a connection to the Unix socket
//!   `<uds_path>_P`, refused (`RST`) if nobody listens there.
//!
//! Threat model: the guest is hostile. Every descriptor chain and header field is bounded
//! and validated (see [`packet`]); a malformed chain is returned unused and logged; protocol
//! violations reset only the offending connection; host memory per connection is bounded by
//! the credit we advertise. Host processes that connect to `uds_path` are trusted as much as
//! the file permissions on it allow, but their handshake line is still bounded and parsed
//! without panics ([`parse_connect_line`]).
//!
//! Threads: the transport calls [`VirtioDevice::activate`] and [`VirtioDevice::reset`] from
//! vCPU threads; the event loop calls [`MutEventSubscriber::process`]. Both hold the
//! device's mutex (other register accesses do not: the transport copies the identity and
//! config space when it is built). Host streams are
//! nonblocking and only ever touched on the event loop; `reset()` only moves them aside and
//! wakes the loop, which deregisters and closes them.

pub mod backend;
mod connect_line;
mod connection;
pub mod packet;

#[cfg(test)]
mod tests;

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};

use crate::guest_warn::guest_warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    next_chain, ActivateError, GuestMemory, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};
use backend::UnixBackend;
use packet::{RxBuffer, MAX_PKT_DATA};

pub use connect_line::{parse_connect_line, ConnectLineError, MAX_CONNECT_LINE};

/// Virtio device ID of vsock.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// Queue indices.
const RXQ: usize = 0;
const TXQ: usize = 1;
/// Most TX chains handled per event-loop wakeup, so a busy guest cannot starve the loop.
const TX_CHAINS_PER_RUN: usize = 512;
/// Period of the timer that expires handshakes and unanswered requests.
const TICK: Duration = Duration::from_millis(500);

/// Why the vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is not usable: CIDs 0, 1 and 2 are reserved and 2^32-1 means any; pick a CID from 3 to 4294967294")]
    InvalidCid(u64),
    #[error("vsock socket path {} is in use (another VMM running?) or stale: remove it", .0.display())]
    PathInUse(PathBuf),
    #[error("cannot listen on vsock socket path {}: {source}; check that its directory exists and is writable", .path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot create the vsock device's event file descriptors: {0}")]
    EventFd(io::Error),
}

/// Queues and memory the driver handed over at activation.
struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    irq: Arc<IrqTrigger>,
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Identity (device, inode) of the socket file we created, so `Drop` removes only it.
    uds_id: Option<(u64, u64)>,
    backend: UnixBackend,
    queue_evts: Vec<EventFd>,
    wake_evt: EventFd,
    timer: TimerFd,
    timer_armed: bool,
    active: Option<Active>,
    tx_paused: bool,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("uds_path", &self.uds_path)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A vsock device for guest `guest_cid`, listening for host processes at `uds_path`.
    ///
    /// Fails if the path already exists (a live or stale socket: the caller decides whether
    /// to remove it), if it cannot be bound, or if the CID is reserved.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Vsock, VsockError> {
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        if fs::symlink_metadata(&uds_path).is_ok() {
            return Err(VsockError::PathInUse(uds_path));
        }
        let listener = UnixListener::bind(&uds_path).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                VsockError::PathInUse(uds_path.clone())
            } else {
                VsockError::Bind {
                    path: uds_path.clone(),
                    source,
                }
            }
        })?;
        let uds_id = fs::symlink_metadata(&uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let make = || EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd);
        let queue_evts = vec![make()?, make()?, make()?];
        let wake_evt = make()?;
        let timer = TimerFd::new().map_err(|e| VsockError::EventFd(e.into()))?;
        let dev = Vsock {
            guest_cid,
            uds_path: uds_path.clone(),
            uds_id,
            backend: UnixBackend::new(guest_cid, uds_path.clone(), listener),
            queue_evts,
            wake_evt,
            timer,
            timer_armed: false,
            active: None,
            tx_paused: false,
            scratch: Vec::with_capacity(MAX_PKT_DATA),
        };
        dev.backend
            .listener()
            .set_nonblocking(true)
            .map_err(|source| VsockError::Bind {
                path: uds_path,
                source,
            })?;
        Ok(dev)
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Ask the event loop to run `process` soon (after activation or reset, which happen on
    /// vCPU threads).
    fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            guest_warn!("vsock: cannot wake the event loop: {e}");
        }
    }

    /// Serve the virtqueues: TX first (it may produce replies), then RX.
    fn run_queues(&mut self) {
        if self.active.is_none() {
            return;
        }
        for _ in 0..2 {
            self.process_tx();
            self.process_rx();
            if !self.tx_paused {
                break;
            }
        }
    }

    /// Take every packet the guest sent, hand it to the backend, return the buffers.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active { mem, queues, irq } = active;
        let Some(q) = queues.get_mut(TXQ) else {
            return;
        };
        let mut used = false;
        let mut handled = 0usize;
        self.tx_paused = false;
        loop {
            if self.backend.rx_backlog_full() {
                // Replies pile up because the guest does not read its RX queue: stop taking
                // its packets until it does.
                self.tx_paused = true;
                break;
            }
            if handled >= TX_CHAINS_PER_RUN {
                // Let other work run; come back on the next loop iteration.
                if let Err(e) = self.wake_evt.write(1) {
                    guest_warn!("vsock: cannot wake the event loop: {e}");
                }
                break;
            }
            let chain = match next_chain(q, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    guest_warn!("vsock: TX queue is unusable: {e}");
                    break;
                }
            };
            handled += 1;
            let head = chain.head_index();
            match packet::read_tx_packet(mem, chain, &mut self.scratch) {
                Ok(hdr) => self.backend.guest_packet(&hdr, &self.scratch),
                Err(e) => guest_warn!("vsock: dropping a malformed TX packet: {e}"),
            }
            if let Err(e) = q.add_used(&*mem, head, 0) {
                guest_warn!("vsock: cannot return a TX buffer to the guest: {e}");
            }
            used = true;
        }
        if used {
            notify(q, mem, irq);
        }
    }

    /// Fill the guest's RX buffers with pending packets.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active { mem, queues, irq } = active;
        let Some(q) = queues.get_mut(RXQ) else {
            return;
        };
        let mut used = false;
        while self.backend.has_rx() {
            let chain = match next_chain(q, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    guest_warn!("vsock: RX queue is unusable: {e}");
                    break;
                }
            };
            let head = chain.head_index();
            let len = match RxBuffer::parse(mem, chain) {
                Ok(buf) => match self.backend.next_rx(buf.data_capacity(), &mut self.scratch) {
                    Some(hdr) => match buf.write(mem, &hdr, &self.scratch) {
                        Ok(len) => len,
                        Err(e) => {
                            guest_warn!("vsock: writing an RX packet failed, packet lost: {e}");
                            0
                        }
                    },
                    None if buf.data_capacity() == 0 => {
                        // Only payload is pending and a header-only buffer cannot carry
                        // any: return it empty rather than stall the queue behind it.
                        guest_warn!("vsock: skipping an RX buffer with no room for payload");
                        0
                    }
                    None => {
                        // Nothing to send after all: give the buffer back untouched.
                        q.go_to_previous_position();
                        break;
                    }
                },
                Err(e) => {
                    guest_warn!("vsock: skipping a malformed RX buffer: {e}");
                    0
                }
            };
            if let Err(e) = q.add_used(&*mem, head, len) {
                guest_warn!("vsock: cannot return an RX buffer to the guest: {e}");
            }
            used = true;
        }
        if used {
            notify(q, mem, irq);
        }
    }

    /// Keep the timer ticking while something waits for a deadline. The timer is only ever
    /// disarmed by its own handler, after reading it: disarming it elsewhere could discard an
    /// expiry whose event is already queued, and the blocking read would then hang the loop.
    fn update_timer(&mut self) {
        if !self.timer_armed && self.backend.has_deadlines() {
            match self.timer.reset(TICK, Some(TICK)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => guest_warn!("vsock: cannot arm the timeout timer: {e}"),
            }
        }
    }

    fn timer_fired(&mut self) {
        if !self.timer_armed {
            return;
        }
        if let Err(e) = self.timer.wait() {
            guest_warn!("vsock: reading the timeout timer failed: {e}");
        }
        self.backend.expire(Instant::now());
        if !self.backend.has_deadlines() {
            match self.timer.clear() {
                Ok(()) => self.timer_armed = false,
                Err(e) => guest_warn!("vsock: cannot stop the timeout timer: {e}"),
            }
        }
    }
}

/// Interrupt the guest if it wants to hear about new used buffers.
fn notify(q: &mut Queue, mem: &GuestMemory, irq: &IrqTrigger) {
    match q.needs_notification(mem) {
        Ok(true) => {
            if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_VRING) {
                guest_warn!("vsock: cannot interrupt the guest: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => guest_warn!("vsock: cannot read the queue's notification state: {e}"),
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// `struct virtio_vsock_config`: guest_cid (le64).
    fn config_space(&self) -> Vec<u8> {
        self.guest_cid.to_le_bytes().to_vec()
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
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
        self.active = Some(Active { mem, queues, irq });
        self.tx_paused = false;
        // Host connections may have queued REQUESTs before the driver was ready.
        self.wake();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.tx_paused = false;
        self.backend.reset();
        self.wake();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<i32> = self.queue_evts.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.wake_evt.as_raw_fd());
        fds.push(self.timer.as_raw_fd());
        fds.push(self.backend.listener().as_raw_fd());
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                guest_warn!("vsock: cannot register with the event loop: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(i) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            // Drain the notification; before activation there is nothing else to do.
            // (The event queue only carries device-to-driver events, which we never send.)
            let _ = self.queue_evts[i].read();
        } else if fd == self.wake_evt.as_raw_fd() {
            let _ = self.wake_evt.read();
        } else if fd == self.timer.as_raw_fd() {
            self.timer_fired();
        } else if fd == self.backend.listener().as_raw_fd() {
            self.backend.accept();
        } else {
            self.backend.host_event(fd, events.event_set());
        }
        self.run_queues();
        self.backend.sync_epoll(ops);
        self.update_timer();
    }
}

impl Vsock {
    /// The path of the socket host processes connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The socket and its `_<port>` siblings are now seen at `uds_path` (the VMM moved into
    /// its own root, see `crate::confine`).
    pub fn rebase(&mut self, uds_path: PathBuf) {
        self.backend.rebase(uds_path.clone());
        self.uds_path = uds_path;
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // Remove the socket file only if it is still the one we bound (not a successor's).
        let ours = fs::symlink_metadata(&self.uds_path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.uds_id {
            if let Err(e) = fs::remove_file(&self.uds_path) {
                guest_warn!(
                    "vsock: cannot remove socket {}: {e}",
                    self.uds_path.display()
                );
            }
        }
    }
}

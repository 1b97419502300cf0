//! Ethernet frames on the virtio-net queues (virtio spec 1.2 §5.1.6): the bounded parsers
//! that take a TX chain to the TAP and put a frame from the TAP into RX chains.
//!
//! Every descriptor here comes from a hostile guest. A TX chain may hold the 12-byte
//! `virtio_net_hdr_v1` and the frame in one descriptor or spread both over many; an RX frame
//! may span several chains (`VIRTIO_NET_F_MRG_RXBUF`). Anything out of bounds, of the wrong
//! direction, empty, too short or oversized is an error for that one packet, never a panic.

use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, BorrowedFd};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _};

use super::super::{next_chain, GuestMemory};

/// Size of `struct virtio_net_hdr_v1` (the header of every frame of a virtio 1.x device,
/// `num_buffers` included); the TAP is told the same with `TUNSETVNETHDRSZ`.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest header + frame taken from or given to the guest: 12 bytes of header plus a
/// 65550-byte frame (a 65535-byte GSO packet with its Ethernet and VLAN headers).
pub const MAX_FRAME_LEN: usize = 65562;
/// Most descriptors one TX chain may have (writev takes at most `IOV_MAX`, 1024).
pub const MAX_TX_DESCRIPTORS: usize = 1024;

/// Why a descriptor chain could not be used for a frame.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the chain holds {0} bytes, fewer than the {NET_HDR_LEN}-byte virtio-net header")]
    TooShort(usize),
    #[error("the chain contains a zero-length descriptor")]
    ZeroLengthDescriptor,
    #[error("a TX descriptor is device-writable; TX buffers must be device-readable")]
    WritableOnTx,
    #[error("an RX descriptor is device-readable; RX buffers must be device-writable")]
    ReadOnlyOnRx,
    #[error("descriptor at guest address {addr:#x} with length {len} lies outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("the chain holds more than {MAX_FRAME_LEN} bytes (header and frame)")]
    Oversized,
    #[error("the chain has more than {MAX_TX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
}

/// One guest buffer, already checked to lie inside guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// Check one descriptor: non-empty, the expected direction, inside guest memory.
fn check_descriptor(
    mem: &GuestMemory,
    desc: &Descriptor,
    writable: bool,
) -> Result<Segment, FrameError> {
    if desc.is_write_only() != writable {
        return Err(if writable {
            FrameError::ReadOnlyOnRx
        } else {
            FrameError::WritableOnTx
        });
    }
    if desc.len() == 0 {
        return Err(FrameError::ZeroLengthDescriptor);
    }
    let len = usize::try_from(desc.len()).map_err(|_| FrameError::Oversized)?;
    if !mem.check_range(desc.addr(), len) {
        return Err(oob(desc.addr(), len));
    }
    Ok(Segment {
        addr: desc.addr(),
        len,
    })
}

fn oob(addr: GuestAddress, len: usize) -> FrameError {
    FrameError::OutOfBounds {
        addr: addr.raw_value(),
        len: u32::try_from(len).unwrap_or(u32::MAX),
    }
}

/// Check a TX chain: every descriptor device-readable, non-empty and in guest memory, at
/// least a header and at most [`MAX_FRAME_LEN`] bytes in all. Leaves the buffers in
/// `segments` and returns the total length (header included).
pub fn parse_tx_chain<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    segments: &mut Vec<Segment>,
) -> Result<usize, FrameError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    segments.clear();
    let mut total = 0usize;
    for desc in chain {
        let seg = check_descriptor(mem, &desc, false)?;
        if segments.len() >= MAX_TX_DESCRIPTORS {
            return Err(FrameError::TooManyDescriptors);
        }
        total = total.saturating_add(seg.len);
        if total > MAX_FRAME_LEN {
            return Err(FrameError::Oversized);
        }
        segments.push(seg);
    }
    if total < NET_HDR_LEN {
        return Err(FrameError::TooShort(total));
    }
    Ok(total)
}

/// Why a TX chain did not reach the TAP.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    /// The chain is malformed.
    #[error("malformed TX chain: {0}")]
    Chain(#[from] FrameError),
    /// The TAP refused the frame (full, down, gone).
    #[error("the TAP did not take the frame: {0}")]
    Tap(io::Error),
}

/// Reusable buffers for sending TX chains.
#[derive(Default)]
pub struct TxScratch {
    segments: Vec<Segment>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs are only filled and used within one `send_tx_chain` call, which also
// holds the guest memory they point into; between calls they are stale and never read.
unsafe impl Send for TxScratch {}

/// Write the frame of one TX chain (header and frame, exactly as the guest wrote them) to
/// `tap` with one `writev`. Returns the number of bytes written.
pub fn send_tx_chain<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    tap: BorrowedFd<'_>,
    scratch: &mut TxScratch,
) -> Result<usize, TxError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let total = parse_tx_chain(mem, chain, &mut scratch.segments)?;
    scratch.iovecs.clear();
    for seg in &scratch.segments {
        // A range inside guest memory may still cross from one region into the next.
        for slice in mem.get_slices(seg.addr, seg.len) {
            let slice = slice.map_err(|_| oob(seg.addr, seg.len))?;
            scratch.iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: slice.len(),
            });
        }
    }
    if scratch.iovecs.len() > MAX_TX_DESCRIPTORS {
        return Err(FrameError::TooManyDescriptors.into());
    }
    let count = libc::c_int::try_from(scratch.iovecs.len())
        .map_err(|_| TxError::Chain(FrameError::TooManyDescriptors))?;
    // SAFETY: every iovec points into guest memory that `mem` keeps mapped for this call and
    // whose range was checked against it; the kernel only reads through them. The guest may
    // change the bytes meanwhile, which garbles only its own frame.
    let n = unsafe { libc::writev(tap.as_raw_fd(), scratch.iovecs.as_ptr(), count) };
    let n = usize::try_from(n).map_err(|_| TxError::Tap(io::Error::last_os_error()))?;
    if n != total {
        return Err(TxError::Tap(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write of {n} of {total} bytes"),
        )));
    }
    Ok(n)
}

/// What became of one frame offered to the RX queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxOutcome {
    /// Written into this many chains (the header's `num_buffers`), returned used.
    Delivered(u16),
    /// The guest has not posted enough buffers: nothing was consumed, try again later.
    NoBuffers,
    /// The frame cannot be delivered (malformed chain, frame too big for the buffers); the
    /// chains taken were returned unused (length 0).
    Dropped(RxDrop),
}

/// Why an RX frame was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxDrop {
    #[error("malformed RX chain: {0}")]
    Chain(FrameError),
    #[error("the {0}-byte frame does not fit the buffers the guest posted")]
    DoesNotFit(usize),
    #[error("the {0}-byte frame from the TAP is shorter than a virtio-net header")]
    ShortFrame(usize),
}

/// One RX chain taken for a frame: its head and where its buffers sit in the segment list.
#[derive(Debug, Clone, Copy)]
struct TakenChain {
    head: u16,
    first: usize,
    end: usize,
    capacity: usize,
}

/// Reusable buffers for delivering RX frames.
#[derive(Debug, Default)]
pub struct RxScratch {
    segments: Vec<Segment>,
    chains: Vec<TakenChain>,
}

/// Check the buffers of one RX chain and append them to `segments`: every descriptor
/// device-writable, non-empty and in guest memory. Returns the chain's capacity (buffers
/// past [`MAX_FRAME_LEN`] are checked but not kept).
fn parse_rx_chain<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    segments: &mut Vec<Segment>,
) -> Result<usize, FrameError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut capacity = 0usize;
    for desc in chain {
        let seg = check_descriptor(mem, &desc, true)?;
        if capacity < MAX_FRAME_LEN {
            capacity = capacity.saturating_add(seg.len);
            segments.push(seg);
        }
    }
    Ok(capacity.min(MAX_FRAME_LEN))
}

/// Put `frame` (a virtio-net header followed by the Ethernet frame, as read from the TAP)
/// into the guest's RX buffers and add them to the used ring (the caller notifies).
///
/// With `mergeable` (`VIRTIO_NET_F_MRG_RXBUF`) the frame may span several chains and the
/// header's `num_buffers` says how many; without it, it must fit one chain and
/// `num_buffers` is 1. When the posted chains are not enough, the queue is rewound and
/// [`RxOutcome::NoBuffers`] returned, unless the whole ring would not hold the frame, in
/// which case it is dropped. An error means the queue itself is unusable.
pub fn deliver_rx_frame(
    q: &mut Queue,
    mem: &GuestMemory,
    frame: &mut [u8],
    mergeable: bool,
    scratch: &mut RxScratch,
) -> Result<RxOutcome, virtio_queue::Error> {
    let len = frame.len();
    if len < NET_HDR_LEN {
        return Ok(RxOutcome::Dropped(RxDrop::ShortFrame(len)));
    }
    if len > MAX_FRAME_LEN {
        return Ok(RxOutcome::Dropped(RxDrop::DoesNotFit(len)));
    }
    scratch.segments.clear();
    scratch.chains.clear();
    let start = q.next_avail();
    let mut capacity = 0usize;
    let mut problem = None;
    while capacity < len {
        if !mergeable && !scratch.chains.is_empty() {
            problem = Some(RxDrop::DoesNotFit(len));
            break;
        }
        if scratch.chains.len() >= usize::from(q.size()) {
            // Every buffer the ring can hold is taken and the frame still does not fit.
            problem = Some(RxDrop::DoesNotFit(len));
            break;
        }
        let Some(chain) = next_chain(q, mem)? else {
            // Give the chains back; the frame waits until the guest posts more.
            q.set_next_avail(start);
            return Ok(RxOutcome::NoBuffers);
        };
        let head = chain.head_index();
        let first = scratch.segments.len();
        match parse_rx_chain(mem, chain, &mut scratch.segments) {
            Ok(cap) => {
                capacity = capacity.saturating_add(cap);
                scratch.chains.push(TakenChain {
                    head,
                    first,
                    end: scratch.segments.len(),
                    capacity: cap,
                });
            }
            Err(e) => {
                scratch.chains.push(TakenChain {
                    head,
                    first,
                    end: first,
                    capacity: 0,
                });
                problem = Some(RxDrop::Chain(e));
                break;
            }
        }
    }
    if problem.is_none() {
        let count = u16::try_from(scratch.chains.len()).unwrap_or(u16::MAX);
        frame[NUM_BUFFERS_OFFSET..NET_HDR_LEN].copy_from_slice(&count.to_le_bytes());
        match write_frame(mem, scratch, frame) {
            Ok(()) => {
                let mut left = len;
                for c in &scratch.chains {
                    let used = c.capacity.min(left);
                    left -= used;
                    // At most MAX_FRAME_LEN, far below u32::MAX.
                    q.add_used(mem, c.head, u32::try_from(used).unwrap_or(0))?;
                }
                return Ok(RxOutcome::Delivered(count));
            }
            Err(e) => problem = Some(RxDrop::Chain(e)),
        }
    }
    for c in &scratch.chains {
        q.add_used(mem, c.head, 0)?;
    }
    Ok(RxOutcome::Dropped(
        problem.unwrap_or(RxDrop::DoesNotFit(len)),
    ))
}

/// Copy `frame` into the taken chains' buffers, in order.
fn write_frame(mem: &GuestMemory, scratch: &RxScratch, frame: &[u8]) -> Result<(), FrameError> {
    let mut rest = frame;
    for c in &scratch.chains {
        let segments = scratch.segments.get(c.first..c.end).unwrap_or(&[]);
        for seg in segments {
            if rest.is_empty() {
                return Ok(());
            }
            let n = seg.len.min(rest.len());
            let (now, later) = rest.split_at(n);
            mem.write_slice(now, seg.addr)
                .map_err(|_| oob(seg.addr, seg.len))?;
            rest = later;
        }
    }
    Ok(())
}

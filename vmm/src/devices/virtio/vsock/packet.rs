//! vsock packets on the virtqueues: the 44-byte header (virtio spec 1.2 §5.10.6) and the
//! bounded parsers that move packets between descriptor chains and host buffers.
//!
//! Every byte here comes from a hostile guest. A chain may put the header and the payload in
//! one descriptor, split them, or spread either over several descriptors (guest kernels ≥ 6.3
//! use one descriptor; zerocopy senders use many): all layouts are accepted, and anything out
//! of bounds, of the wrong direction, empty or oversized is an error, never a panic.
//!
//! (`virtio_vsock::packet::VsockPacket` is not used because it looks at no more than two
//! descriptors, so a payload spread over several is rejected or misread.)

use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory as _};

use super::super::GuestMemory;

/// Size of the vsock packet header.
pub const HDR_LEN: usize = 44;
/// Largest payload of one packet we accept from or send to the guest (what Linux uses).
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// The only socket type the device supports.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`op` field).
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A vsock packet header, decoded (all fields little endian on the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decode a header from its wire form.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(v)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encode the header in its wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a descriptor chain could not be used as a vsock packet.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("the descriptor chain holds fewer than the {HDR_LEN} bytes of a vsock header")]
    TooShort,
    #[error("the descriptor chain contains a zero-length descriptor")]
    ZeroLengthDescriptor,
    #[error("a TX descriptor is device-writable; TX buffers must be device-readable")]
    WritableOnTx,
    #[error("an RX descriptor is device-readable; RX buffers must be device-writable")]
    ReadOnlyOnRx,
    #[error("descriptor at guest address {addr:#x} with length {len} lies outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("the header announces {0} payload bytes, more than the maximum {MAX_PKT_DATA}")]
    Oversized(u32),
    #[error("the header announces {len} payload bytes but the chain only holds {avail}")]
    LenBeyondChain { len: u32, avail: usize },
    #[error("the RX buffer of {avail} bytes is too small for a {need}-byte packet")]
    RxBufferTooSmall { need: usize, avail: usize },
}

/// One guest buffer, already checked to lie inside guest memory.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// Check one descriptor: non-empty, the expected direction, inside guest memory.
fn check_descriptor(
    mem: &GuestMemory,
    desc: &Descriptor,
    writable: bool,
) -> Result<Segment, ChainError> {
    if desc.is_write_only() != writable {
        return Err(if writable {
            ChainError::ReadOnlyOnRx
        } else {
            ChainError::WritableOnTx
        });
    }
    if desc.len() == 0 {
        return Err(ChainError::ZeroLengthDescriptor);
    }
    let len = desc.len() as usize;
    if !mem.check_range(desc.addr(), len) {
        return Err(ChainError::OutOfBounds {
            addr: desc.addr().raw_value(),
            len: desc.len(),
        });
    }
    Ok(Segment {
        addr: desc.addr(),
        len,
    })
}

fn oob(seg: Segment) -> ChainError {
    ChainError::OutOfBounds {
        addr: seg.addr.raw_value(),
        len: u32::try_from(seg.len).unwrap_or(u32::MAX),
    }
}

/// Read a packet the guest put on the TX queue: returns its header and leaves its payload
/// (exactly `header.len` bytes) in `data`. Bytes after the payload are ignored, but every
/// descriptor of the chain must be valid.
pub fn read_tx_packet<M>(
    mem: &GuestMemory,
    chain: DescriptorChain<M>,
    data: &mut Vec<u8>,
) -> Result<PacketHeader, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    data.clear();
    let mut hdr_buf = [0u8; HDR_LEN];
    let mut hdr_filled = 0usize;
    let mut hdr: Option<PacketHeader> = None;
    let mut complete = false;
    for desc in chain {
        // Every descriptor is checked, even those after the payload, which are not read.
        let seg = check_descriptor(mem, &desc, false)?;
        if complete {
            continue;
        }
        let mut off = 0usize;
        if hdr.is_none() {
            let n = (HDR_LEN - hdr_filled).min(seg.len);
            mem.read_slice(&mut hdr_buf[hdr_filled..hdr_filled + n], seg.addr)
                .map_err(|_| oob(seg))?;
            hdr_filled += n;
            off = n;
            if hdr_filled == HDR_LEN {
                let h = PacketHeader::from_bytes(&hdr_buf);
                if h.len as usize > MAX_PKT_DATA {
                    return Err(ChainError::Oversized(h.len));
                }
                hdr = Some(h);
            }
        }
        let Some(h) = hdr else { continue };
        let want = (h.len as usize).saturating_sub(data.len());
        let n = want.min(seg.len - off);
        if n > 0 {
            let start = data.len();
            data.resize(start + n, 0);
            let addr = seg.addr.checked_add(off as u64).ok_or_else(|| oob(seg))?;
            mem.read_slice(&mut data[start..], addr)
                .map_err(|_| oob(seg))?;
        }
        complete = data.len() == h.len as usize;
    }
    let h = hdr.ok_or(ChainError::TooShort)?;
    if data.len() < h.len as usize {
        return Err(ChainError::LenBeyondChain {
            len: h.len,
            avail: data.len(),
        });
    }
    Ok(h)
}

/// A chain from the RX queue, checked and ready to receive one packet.
#[derive(Debug)]
pub struct RxBuffer {
    segments: Vec<Segment>,
    capacity: usize,
}

impl RxBuffer {
    /// Check the writable buffers of an RX chain. Buffers beyond what the largest packet
    /// needs are checked but not used.
    pub fn parse<M>(mem: &GuestMemory, chain: DescriptorChain<M>) -> Result<Self, ChainError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut segments = Vec::new();
        let mut capacity = 0usize;
        for desc in chain {
            // Every descriptor is checked; those beyond the largest packet are not used.
            let seg = check_descriptor(mem, &desc, true)?;
            if capacity < HDR_LEN + MAX_PKT_DATA {
                capacity = capacity.saturating_add(seg.len);
                segments.push(seg);
            }
        }
        if capacity < HDR_LEN {
            return Err(ChainError::TooShort);
        }
        Ok(Self { segments, capacity })
    }

    /// How many payload bytes fit after the header.
    pub fn data_capacity(&self) -> usize {
        (self.capacity - HDR_LEN).min(MAX_PKT_DATA)
    }

    /// Write `hdr` followed by `data`; returns the number of bytes written (the used length).
    pub fn write(
        &self,
        mem: &GuestMemory,
        hdr: &PacketHeader,
        data: &[u8],
    ) -> Result<u32, ChainError> {
        let need = HDR_LEN + data.len();
        if need > self.capacity {
            return Err(ChainError::RxBufferTooSmall {
                need,
                avail: self.capacity,
            });
        }
        let hdr_bytes = hdr.to_bytes();
        let mut parts: [&[u8]; 2] = [&hdr_bytes, data];
        let mut part = 0usize;
        for seg in &self.segments {
            let mut off = 0usize;
            while off < seg.len && part < parts.len() {
                let src = parts[part];
                let n = src.len().min(seg.len - off);
                let addr = seg.addr.checked_add(off as u64).ok_or_else(|| oob(*seg))?;
                mem.write_slice(&src[..n], addr).map_err(|_| oob(*seg))?;
                off += n;
                parts[part] = &src[n..];
                if parts[part].is_empty() {
                    part += 1;
                }
            }
            if part >= parts.len() {
                break;
            }
        }
        // `need` is at most HDR_LEN + MAX_PKT_DATA, far below u32::MAX.
        Ok(u32::try_from(need).unwrap_or(u32::MAX))
    }
}

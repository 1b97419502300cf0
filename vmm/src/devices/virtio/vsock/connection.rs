//! One vsock stream connection between a guest socket and a host Unix stream.
//!
//! Flow control (virtio spec 1.2 §5.10.6.3): both sides advertise a receive buffer
//! (`buf_alloc`) and count the bytes they consumed (`fwd_cnt`). We send the guest at most
//! `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)` bytes; the guest may have at most
//! `CONN_BUF_ALLOC` bytes in flight towards the host, which we buffer while the host stream
//! is not writable. A guest that overruns that credit gets its connection reset, so host
//! memory per connection stays bounded.
//!
//! Closing: the host reading end of file sends the guest `SHUTDOWN(SEND)` (the host may still
//! read: a half close); the host closing completely (EPOLLHUP) sends `SHUTDOWN(RCV|SEND)` and
//! waits up to `SHUTDOWN_TIMEOUT` for the guest's `RST`. The guest's `SHUTDOWN(SEND)` shuts
//! the host stream's write half once buffered data is flushed; when neither side has data left
//! to send (or the guest sets both flags) we answer `RST` and close the host stream.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    PacketHeader, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::HOST_CID;

/// Receive buffer we advertise to the guest for each connection (bytes buffered towards the
/// host while its stream is not writable).
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send the guest a `CREDIT_UPDATE` once this many bytes were consumed since it last heard.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 2;
/// How long the guest has to answer a host-initiated `REQUEST`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest has to answer our `SHUTDOWN(RCV|SEND)` with `RST`.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection is named by its host-side port and its guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Host-initiated: `REQUEST` queued or sent, waiting for the guest's `RESPONSE`.
    AwaitingResponse,
    Established,
}

/// Control packets waiting for a place on the RX queue.
mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const CREDIT_UPDATE: u8 = 4;
    pub const CREDIT_REQUEST: u8 = 8;
}

/// The guest broke the protocol on this connection; it gets reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {got} bytes beyond the {CONN_BUF_ALLOC}-byte credit we gave it")]
    CreditOverrun { got: usize },
    #[error("the guest sent data on a connection that is not established or that it shut down")]
    UnexpectedData,
    #[error("writing to the host stream failed: {0}")]
    HostWrite(io::Error),
}

/// Result of reading from the host stream.
#[derive(Debug, PartialEq, Eq)]
pub enum HostRead {
    Data,
    WouldBlock,
    Eof,
}

/// What the connection needs from its owner after a change.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Close the host stream and tell the guest `RST`.
    Reset,
}

#[derive(Debug)]
pub struct Connection {
    pub key: ConnKey,
    stream: UnixStream,
    phase: Phase,
    /// The guest knows this connection (it opened it, or received our `REQUEST`), so closing
    /// it must be announced with `RST`.
    pub guest_knows: bool,
    /// When the guest must have answered (`REQUEST` or full `SHUTDOWN`), if it must.
    pub deadline: Option<Instant>,
    /// Events currently registered on the event loop (`None`: not registered).
    pub registered: Option<EventSet>,
    /// Already in the backend's RX schedule.
    pub in_rx_ready: bool,
    pending: u8,
    shutdown_pending: u32,

    // Host → guest.
    stash: Vec<u8>,
    stash_pos: usize,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,
    host_read_closed: bool,
    host_hung_up: bool,
    shutdown_send_sent: bool,
    full_shutdown_sent: bool,

    // Guest → host.
    tx_buf: VecDeque<u8>,
    /// Bytes at the front of `tx_buf` that are our `OK <port>\n`, not guest payload.
    tx_ctrl_bytes: usize,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    guest_shutdown: u32,
    write_closed: bool,
}

impl Connection {
    fn new(stream: UnixStream, key: ConnKey, phase: Phase) -> Self {
        Self {
            key,
            stream,
            phase,
            guest_knows: false,
            deadline: None,
            registered: None,
            in_rx_ready: false,
            pending: 0,
            shutdown_pending: 0,
            stash: Vec::new(),
            stash_pos: 0,
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_read_closed: false,
            host_hung_up: false,
            shutdown_send_sent: false,
            full_shutdown_sent: false,
            tx_buf: VecDeque::new(),
            tx_ctrl_bytes: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shutdown: 0,
            write_closed: false,
        }
    }

    /// A host process connected and asked for a guest port: queue a `REQUEST`. `early_data`
    /// is what the host sent right after its handshake line; it goes to the guest once the
    /// connection is established.
    pub fn host_initiated(
        stream: UnixStream,
        key: ConnKey,
        early_data: Vec<u8>,
        registered: Option<EventSet>,
    ) -> Self {
        let mut c = Self::new(stream, key, Phase::AwaitingResponse);
        c.pending = pending::REQUEST;
        c.stash = early_data;
        c.registered = registered;
        c
    }

    /// The guest connected to a host listener that accepted: queue a `RESPONSE`.
    pub fn guest_initiated(stream: UnixStream, key: ConnKey, hdr: &PacketHeader) -> Self {
        let mut c = Self::new(stream, key, Phase::Established);
        c.guest_knows = true;
        c.pending = pending::RESPONSE;
        c.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        c
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Give up the host stream (for closing it after deregistration).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// How many bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Every guest packet carries its receive buffer state.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// The guest asked how much room we have.
    pub fn queue_credit_update(&mut self) {
        self.pending |= pending::CREDIT_UPDATE;
    }

    /// The guest accepted our `REQUEST`: tell the host process `OK <port>\n`.
    pub fn recv_response(&mut self) -> Result<(), ConnError> {
        if self.phase != Phase::AwaitingResponse {
            return Err(ConnError::UnexpectedData);
        }
        self.phase = Phase::Established;
        self.deadline = None;
        let line = format!("OK {}\n", self.key.local_port);
        self.tx_buf.extend(line.as_bytes());
        self.tx_ctrl_bytes += line.len();
        self.flush()
    }

    /// Payload from the guest for the host stream.
    pub fn recv_rw(&mut self, data: &[u8]) -> Result<(), ConnError> {
        if self.phase != Phase::Established || self.guest_shutdown & SHUTDOWN_SEND != 0 {
            return Err(ConnError::UnexpectedData);
        }
        if data.is_empty() {
            return Ok(());
        }
        let buffered = self.tx_buf.len() - self.tx_ctrl_bytes;
        if buffered + data.len() > CONN_BUF_ALLOC as usize {
            return Err(ConnError::CreditOverrun {
                got: buffered + data.len(),
            });
        }
        let mut rest = data;
        if self.tx_buf.is_empty() {
            match send(&self.stream, &[IoSlice::new(data)]) {
                Ok(n) => {
                    self.consumed(n);
                    rest = &data[n..];
                }
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(ConnError::HostWrite(e)),
            }
        }
        self.tx_buf.extend(rest);
        Ok(())
    }

    /// The guest will send (`SEND`) and/or receive (`RCV`) no more.
    pub fn recv_shutdown(&mut self, flags: u32) {
        self.guest_shutdown |= flags & SHUTDOWN_BOTH;
        if self.guest_shutdown & SHUTDOWN_RCV != 0 {
            // Nobody will read what we hold for the guest.
            self.stash.clear();
            self.stash_pos = 0;
        }
    }

    /// The host stream reported hang-up or error: it is gone for good.
    pub fn host_hung_up(&mut self) {
        self.host_hung_up = true;
    }

    /// Write buffered guest data to the host stream, as much as it takes.
    pub fn flush(&mut self) -> Result<(), ConnError> {
        while !self.tx_buf.is_empty() {
            let (a, b) = self.tx_buf.as_slices();
            match send(&self.stream, &[IoSlice::new(a), IoSlice::new(b)]) {
                Ok(0) => return Err(ConnError::HostWrite(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    let ctrl = n.min(self.tx_ctrl_bytes);
                    self.tx_ctrl_bytes -= ctrl;
                    self.tx_buf.drain(..n.min(self.tx_buf.len()));
                    self.consumed(n - ctrl);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_transient(&e) => break,
                Err(e) => return Err(ConnError::HostWrite(e)),
            }
        }
        if self.tx_buf.is_empty() && self.tx_buf.capacity() > MAX_PKT_DATA {
            self.tx_buf.shrink_to(MAX_PKT_DATA);
        }
        Ok(())
    }

    /// `n` guest bytes reached the host stream.
    fn consumed(&mut self, n: usize) {
        // n <= CONN_BUF_ALLOC, so the truncation cannot happen.
        self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    /// Host data may be read now: established, nothing held back, the guest has room and
    /// still wants data, and the host has not ended its stream.
    pub fn wants_read(&self) -> bool {
        self.phase == Phase::Established
            && self.stash_pos >= self.stash.len()
            && !self.host_read_closed
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Read what the guest has room for (at most one maximum packet) from the host stream.
    pub fn read_host(&mut self) -> io::Result<HostRead> {
        let n = (self.peer_credit() as usize).min(MAX_PKT_DATA);
        self.stash.resize(n, 0);
        self.stash_pos = 0;
        let res = loop {
            match self.stream.read(&mut self.stash) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match res {
            Ok(0) => {
                self.stash.clear();
                self.host_read_closed = true;
                Ok(HostRead::Eof)
            }
            Ok(k) => {
                self.stash.truncate(k);
                Ok(HostRead::Data)
            }
            Err(e) => {
                self.stash.clear();
                if is_transient(&e) {
                    Ok(HostRead::WouldBlock)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Bytes we could put on the RX queue right now.
    fn deliverable(&self) -> usize {
        if self.phase != Phase::Established {
            return 0;
        }
        (self.stash.len() - self.stash_pos.min(self.stash.len())).min(self.peer_credit() as usize)
    }

    /// Something is waiting for the RX queue.
    pub fn has_rx(&self) -> bool {
        self.pending != 0 || self.shutdown_pending != 0 || self.deliverable() > 0
    }

    /// Advance the close protocol after any change.
    pub fn progress(&mut self, now: Instant) -> Verdict {
        if self.phase == Phase::AwaitingResponse {
            return if self.host_hung_up {
                Verdict::Reset
            } else {
                Verdict::Keep
            };
        }
        let flushed = self.tx_buf.is_empty();
        if self.guest_shutdown == SHUTDOWN_BOTH && flushed {
            return Verdict::Reset;
        }
        if self.guest_shutdown & SHUTDOWN_SEND != 0 && flushed && !self.write_closed {
            // The guest sends no more: pass the end of stream on to the host.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.write_closed = true;
        }
        let host_to_guest_done = self.host_read_closed || self.guest_shutdown & SHUTDOWN_RCV != 0;
        if host_to_guest_done && self.guest_shutdown & SHUTDOWN_SEND != 0 && flushed {
            // Neither side has anything left to send.
            return Verdict::Reset;
        }
        if self.host_hung_up {
            if host_to_guest_done && !self.full_shutdown_sent {
                self.shutdown_pending |= SHUTDOWN_BOTH;
                self.full_shutdown_sent = true;
                self.deadline = Some(now + SHUTDOWN_TIMEOUT);
            }
        } else if self.host_read_closed && !self.shutdown_send_sent {
            self.shutdown_pending |= SHUTDOWN_SEND;
            self.shutdown_send_sent = true;
        }
        Verdict::Keep
    }

    /// Events the host stream should be watched for (`None`: do not watch it at all).
    pub fn desired_interest(&self) -> Option<EventSet> {
        if self.host_hung_up {
            // Hang-up is level triggered and cannot be masked: stop watching; reads and
            // writes are driven by guest activity until the connection closes.
            return None;
        }
        let mut set = EventSet::empty();
        if self.wants_read() {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Take the next packet for the guest: control packets first, then payload, then a
    /// shutdown (which only follows the last payload byte). The payload goes to `out`.
    pub fn next_rx(
        &mut self,
        guest_cid: u64,
        data_cap: usize,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> Option<PacketHeader> {
        out.clear();
        let mut flags = 0;
        let op = if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            self.guest_knows = true;
            self.deadline = Some(now + CONNECT_TIMEOUT);
            OP_REQUEST
        } else if self.pending & pending::RESPONSE != 0 {
            self.pending &= !pending::RESPONSE;
            OP_RESPONSE
        } else if self.pending & pending::CREDIT_UPDATE != 0 {
            self.pending &= !pending::CREDIT_UPDATE;
            OP_CREDIT_UPDATE
        } else if self.pending & pending::CREDIT_REQUEST != 0 {
            self.pending &= !pending::CREDIT_REQUEST;
            OP_CREDIT_REQUEST
        } else if self.deliverable().min(data_cap) > 0 {
            let n = self.deliverable().min(data_cap);
            out.extend_from_slice(&self.stash[self.stash_pos..self.stash_pos + n]);
            self.stash_pos += n;
            if self.stash_pos >= self.stash.len() {
                self.stash.clear();
                self.stash_pos = 0;
            }
            // n <= MAX_PKT_DATA.
            self.rx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
            if self.peer_credit() == 0 && !self.credit_requested && !self.host_read_closed {
                self.pending |= pending::CREDIT_REQUEST;
                self.credit_requested = true;
            }
            OP_RW
        } else if self.shutdown_pending != 0 {
            flags = std::mem::take(&mut self.shutdown_pending);
            OP_SHUTDOWN
        } else {
            return None;
        };
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some(PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            // out.len() <= MAX_PKT_DATA.
            len: u32::try_from(out.len()).unwrap_or(0),
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        })
    }
}

/// Write to the host stream without raising SIGPIPE when its reader is gone (`EPIPE` is
/// handled as an error instead, whatever the process's signal disposition).
fn send(stream: &UnixStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    socket2::SockRef::from(stream).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL)
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

//! The hybrid Unix-socket backend: host processes reach guest ports through one listening
//! socket (`CONNECT <port>\n` → `OK <local port>\n`), guest connections to host port `P`
//! become connections to the Unix socket `<uds_path>_P`.
//!
//! The backend knows nothing about virtqueues: the device hands it parsed guest packets and
//! asks it for the next packet for the guest. It never registers file descriptors itself;
//! it records what each host stream should be watched for, and `sync_epoll` applies that on
//! the event loop (so that streams closed from a vCPU thread, on reset, are deregistered
//! before their descriptor numbers can be reused).

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events};
use socket2::{Domain, SockAddr, Socket, Type};
use tracing::debug;

use crate::guest_warn::guest_warn;
use vmm_sys_util::epoll::EventSet;

use super::connect_line::{LineBuffer, LineStatus};
use super::connection::{ConnKey, Connection, HostRead, Verdict};
use super::packet::{
    PacketHeader, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TYPE_STREAM,
};
use super::HOST_CID;

/// Most connections one device keeps (each may buffer up to `CONN_BUF_ALLOC` + 64 KiB).
pub const MAX_CONNECTIONS: usize = 512;
/// Most host connections still sending their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 64;
/// How long a host process has to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// `RST`s for unknown connections waiting for the RX queue; beyond this the device stops
/// taking TX packets until the guest drains its RX queue.
const MAX_ORPHAN_RSTS: usize = 256;
/// Host-side ports for host-initiated connections are allocated from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Most connections accepted from the listener per event.
const ACCEPTS_PER_EVENT: usize = 16;

/// A host process connected to the listener and has not finished `CONNECT <port>\n`.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: LineBuffer,
    deadline: Instant,
    registered: bool,
}

#[derive(Debug)]
pub struct UnixBackend {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    conn_by_fd: HashMap<RawFd, ConnKey>,
    /// Connections with something for the RX queue, served round robin.
    rx_ready: VecDeque<ConnKey>,
    /// `RST`s to send that belong to no (remaining) connection.
    orphan_rsts: VecDeque<PacketHeader>,
    /// Closed host streams that must leave the event loop before they are dropped.
    graveyard: Vec<(UnixStream, bool)>,
    next_local_port: u32,
}

impl UnixBackend {
    pub fn new(guest_cid: u64, uds_path: PathBuf, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path,
            listener,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            conn_by_fd: HashMap::new(),
            rx_ready: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            graveyard: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
        }
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The descriptors of the host streams (handshakes and connections), for a driver that
    /// polls them itself instead of through the event loop (the `vsock_backend` fuzz target).
    pub fn host_fds(&self) -> Vec<RawFd> {
        self.handshakes
            .keys()
            .chain(self.conn_by_fd.keys())
            .copied()
            .collect()
    }

    /// Number of open connections.
    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Drop every connection and half-done handshake (device reset). The guest is going
    /// away, so no `RST` is sent.
    pub fn reset(&mut self) {
        for (_, hs) in self.handshakes.drain() {
            self.graveyard.push((hs.stream, hs.registered));
        }
        for (_, c) in self.conns.drain() {
            let registered = c.registered.is_some();
            self.graveyard.push((c.into_stream(), registered));
        }
        self.conn_by_fd.clear();
        self.rx_ready.clear();
        self.orphan_rsts.clear();
    }

    /// Accept host processes waiting on the listener.
    pub fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    guest_warn!("vsock: accepting a host connection failed: {e}");
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                guest_warn!("vsock: {MAX_HANDSHAKES} host connections are still handshaking; closing a new one");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                guest_warn!("vsock: cannot make a host connection nonblocking: {e}");
                continue;
            }
            let hs = Handshake {
                stream,
                line: LineBuffer::default(),
                deadline: Instant::now() + HANDSHAKE_TIMEOUT,
                registered: false,
            };
            self.handshakes.insert(hs.stream.as_raw_fd(), hs);
        }
    }

    /// An event on a host stream (handshake or connection).
    pub fn host_event(&mut self, fd: RawFd, set: EventSet) {
        if self.handshakes.contains_key(&fd) {
            self.handshake_readable(fd);
        } else if let Some(&key) = self.conn_by_fd.get(&fd) {
            self.conn_event(key, set);
        } else {
            debug!("vsock: event for a host stream that is already closed");
        }
    }

    fn close_handshake(&mut self, fd: RawFd) {
        if let Some(hs) = self.handshakes.remove(&fd) {
            self.graveyard.push((hs.stream, hs.registered));
        }
    }

    fn handshake_readable(&mut self, fd: RawFd) {
        let status = {
            let Some(hs) = self.handshakes.get_mut(&fd) else {
                return;
            };
            loop {
                let Handshake { stream, line, .. } = hs;
                match stream.read(line.spare()) {
                    Ok(0) => break Err(line.eof()),
                    Ok(n) => match line.filled(n) {
                        Ok(LineStatus::Incomplete) => continue,
                        other => break other,
                    },
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) => {
                        debug!("vsock: reading a host handshake failed: {e}");
                        self.close_handshake(fd);
                        return;
                    }
                }
            }
        };
        match status {
            Ok(LineStatus::Complete { port, rest }) => self.host_connect(fd, port, rest),
            Ok(LineStatus::Incomplete) => {}
            Err(e) => {
                guest_warn!("vsock: closing a host connection with a bad handshake: {e}");
                self.close_handshake(fd);
            }
        }
    }

    /// A host process asked for guest `port`: queue the `REQUEST`.
    fn host_connect(&mut self, fd: RawFd, port: u32, early_data: Vec<u8>) {
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let local_port = match self.allocate_local_port() {
            Some(p) if self.conns.len() < MAX_CONNECTIONS => p,
            _ => {
                guest_warn!("vsock: {MAX_CONNECTIONS} connections are open; refusing a host connection to port {port}");
                self.graveyard.push((hs.stream, hs.registered));
                return;
            }
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let registered = hs.registered.then_some(EventSet::IN);
        debug!("vsock: host connects to guest port {port} from host port {local_port}");
        let conn = Connection::host_initiated(hs.stream, key, early_data, registered);
        self.insert(conn);
    }

    fn allocate_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }

    fn insert(&mut self, conn: Connection) {
        let key = conn.key;
        self.conn_by_fd.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    /// Close a connection; tell the guest `RST` if it knows the connection and `rst` is set.
    fn kill(&mut self, key: ConnKey, rst: bool) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.conn_by_fd.remove(&conn.stream().as_raw_fd());
        if rst && conn.guest_knows {
            self.queue_rst(key.local_port, key.peer_port);
        }
        let registered = conn.registered.is_some();
        self.graveyard.push((conn.into_stream(), registered));
    }

    fn queue_rst(&mut self, local_port: u32, peer_port: u32) {
        if self.orphan_rsts.len() >= 2 * MAX_ORPHAN_RSTS {
            guest_warn!("vsock: the guest does not drain its RX queue; dropping an RST");
            return;
        }
        self.orphan_rsts.push_back(PacketHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        });
    }

    /// Bring a connection forward after any change: read host data if the guest has room,
    /// advance the close protocol, schedule it for the RX queue.
    fn after_change(&mut self, key: ConnKey) {
        let now = Instant::now();
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.wants_read() {
            match conn.read_host() {
                Ok(HostRead::Data | HostRead::WouldBlock | HostRead::Eof) => {}
                Err(e) => {
                    debug!(
                        "vsock: reading host stream for guest port {} failed: {e}",
                        key.peer_port
                    );
                    self.kill(key, true);
                    return;
                }
            }
        }
        if conn.progress(now) == Verdict::Reset {
            self.kill(key, true);
            return;
        }
        if conn.has_rx() && !conn.in_rx_ready {
            conn.in_rx_ready = true;
            self.rx_ready.push_back(key);
        }
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.host_hung_up();
        }
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            if let Err(e) = conn.flush() {
                debug!(
                    "vsock: host stream for guest port {} closed: {e}",
                    key.peer_port
                );
                self.kill(key, true);
                return;
            }
        }
        self.after_change(key);
    }

    /// True when the guest should not get more TX packets processed until it drains RX.
    pub fn rx_backlog_full(&self) -> bool {
        self.orphan_rsts.len() >= MAX_ORPHAN_RSTS
    }

    /// A packet the guest sent, with its payload.
    pub fn guest_packet(&mut self, hdr: &PacketHeader, data: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            guest_warn!(
                "vsock: dropping a guest packet with source CID {} (the guest is CID {})",
                hdr.src_cid,
                self.guest_cid
            );
            return;
        }
        if hdr.dst_cid != HOST_CID {
            debug!("vsock: dropping a guest packet for CID {}", hdr.dst_cid);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            debug!(
                "vsock: the guest used socket type {}; only streams exist",
                hdr.type_
            );
            if hdr.op != OP_RST {
                self.kill(key, false);
                self.queue_rst(key.local_port, key.peer_port);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op {
                OP_REQUEST => self.guest_connect(key, hdr),
                OP_RST => {}
                _ => self.queue_rst(key.local_port, key.peer_port),
            }
            return;
        };
        conn.update_peer_credit(hdr.buf_alloc, hdr.fwd_cnt);
        let result = match hdr.op {
            OP_RESPONSE => conn.recv_response(),
            OP_RW => conn.recv_rw(data),
            OP_SHUTDOWN => {
                conn.recv_shutdown(hdr.flags);
                conn.flush()
            }
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                conn.queue_credit_update();
                Ok(())
            }
            OP_RST => {
                debug!(
                    "vsock: the guest reset the connection from port {}",
                    key.peer_port
                );
                self.kill(key, false);
                return;
            }
            op => {
                debug!("vsock: unexpected op {op} on an open connection; resetting it");
                self.kill(key, true);
                return;
            }
        };
        if let Err(e) = result {
            debug!(
                "vsock: resetting the connection to guest port {}: {e}",
                key.peer_port
            );
            self.kill(key, true);
            return;
        }
        self.after_change(key);
    }

    /// The guest connects to host port `key.local_port`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &PacketHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            guest_warn!("vsock: {MAX_CONNECTIONS} connections are open; refusing the guest's connection to port {}", key.local_port);
            self.queue_rst(key.local_port, key.peer_port);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                debug!(
                    "vsock: guest port {} connected to {}",
                    key.peer_port,
                    path.display()
                );
                self.insert(Connection::guest_initiated(stream, key, hdr));
            }
            Err(e) => {
                debug!("vsock: guest connection to {} refused: {e}", path.display());
                self.queue_rst(key.local_port, key.peer_port);
            }
        }
    }

    /// Whether a packet is waiting for the RX queue.
    pub fn has_rx(&mut self) -> bool {
        if !self.orphan_rsts.is_empty() {
            return true;
        }
        while let Some(key) = self.rx_ready.front().copied() {
            match self.conns.get_mut(&key) {
                Some(c) if c.has_rx() => return true,
                Some(c) => c.in_rx_ready = false,
                None => {}
            }
            self.rx_ready.pop_front();
        }
        false
    }

    /// The next packet for the guest, its payload (at most `data_cap` bytes) in `out`.
    pub fn next_rx(&mut self, data_cap: usize, out: &mut Vec<u8>) -> Option<PacketHeader> {
        if let Some(hdr) = self.orphan_rsts.pop_front() {
            out.clear();
            return Some(hdr);
        }
        let now = Instant::now();
        // Each scheduled connection is looked at once: one whose only packet is payload that
        // does not fit this buffer (`data_cap` 0) stays scheduled for the next buffer.
        for _ in 0..self.rx_ready.len() {
            let Some(key) = self.rx_ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            match conn.next_rx(self.guest_cid, data_cap, out, now) {
                Some(hdr) => {
                    conn.in_rx_ready = false;
                    self.after_change(key);
                    return Some(hdr);
                }
                None if conn.has_rx() => self.rx_ready.push_back(key),
                None => conn.in_rx_ready = false,
            }
        }
        None
    }

    /// Close what timed out: handshakes never finished, `REQUEST`s and full `SHUTDOWN`s the
    /// guest never answered.
    pub fn expire(&mut self, now: Instant) {
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, hs)| hs.deadline <= now)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            debug!("vsock: a host connection sent no CONNECT line in time; closing it");
            self.close_handshake(fd);
        }
        let stale: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| c.key)
            .collect();
        for key in stale {
            debug!(
                "vsock: the guest did not answer on port {} in time; resetting",
                key.peer_port
            );
            self.kill(key, true);
        }
    }

    /// Whether anything waits for a deadline (the device then keeps its timer running).
    pub fn has_deadlines(&self) -> bool {
        !self.handshakes.is_empty() || self.conns.values().any(|c| c.deadline.is_some())
    }

    /// Apply the recorded watch changes to the event loop and close dead host streams.
    pub fn sync_epoll(&mut self, ops: &mut EventOps) {
        for (stream, registered) in self.graveyard.drain(..) {
            if registered {
                if let Err(e) = ops.remove(Events::empty(&stream)) {
                    guest_warn!("vsock: removing a host stream from the event loop failed: {e:?}");
                }
            }
        }
        let mut failed_hs = Vec::new();
        for (&fd, hs) in self.handshakes.iter_mut().filter(|(_, hs)| !hs.registered) {
            match ops.add(Events::new(&hs.stream, EventSet::IN)) {
                Ok(()) => hs.registered = true,
                Err(e) => {
                    guest_warn!("vsock: watching a host connection failed: {e:?}");
                    failed_hs.push(fd);
                }
            }
        }
        let mut failed = Vec::new();
        for conn in self.conns.values_mut() {
            let want = conn.desired_interest();
            if want == conn.registered {
                continue;
            }
            let res = match (conn.registered, want) {
                (None, Some(set)) => ops.add(Events::new(conn.stream(), set)),
                (Some(_), Some(set)) => ops.modify(Events::new(conn.stream(), set)),
                (Some(_), None) => ops.remove(Events::empty(conn.stream())),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    guest_warn!("vsock: updating the watch on a host stream failed: {e:?}");
                    failed.push(conn.key);
                }
            }
        }
        for fd in failed_hs {
            self.close_handshake(fd);
        }
        for key in failed {
            self.kill(key, true);
        }
        // Streams closed just now were never successfully (re)registered, or are dropped
        // after their removal above on the next call; drop the unregistered ones now.
        self.graveyard.retain(|(_, registered)| *registered);
    }

    /// Guest connections now go to `<uds_path>_<port>` under this path.
    pub fn rebase(&mut self, uds_path: PathBuf) {
        self.uds_path = uds_path;
    }
}

/// `<uds_path>_<port>`: where guest connections to host port `port` go.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connect to a Unix stream socket without blocking the event loop: a listener whose
/// backlog is full fails with `EAGAIN` instead of stalling the VMM.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

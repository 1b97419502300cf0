//! The vsock backend's connection state machine under any sequence of guest packets and host
//! actions: never a panic, and every packet it hands the guest is well formed (from the host
//! CID to the guest's, a payload no larger than the buffer and its header's `len`).
//!
//! Input: a sequence of operations, each a tag byte and its operands:
//! - 0: a guest packet: 44 header bytes (a flag byte first decides whether the CIDs are made
//!   right and the destination port one of the two host listeners'), a length byte, payload;
//! - 1: the guest drains up to 16 RX packets into buffers of `byte * 64` payload bytes;
//! - 2: a host process connects to the backend's socket and writes `CONNECT <byte>\n`;
//! - 3: a host stream (index byte) writes `byte` bytes;
//! - 4: a host stream (index byte) is shut down or dropped;
//! - 5: `byte` seconds pass (handshake and request deadlines);
//! - 6: the device is reset.
//!
//! After each operation the backend is told that every host stream may be readable,
//! writable or hung up, as the event loop would, and host listeners accept what the guest
//! connected.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use brig_vmm::devices::virtio::vsock::backend::UnixBackend;
use brig_vmm::devices::virtio::vsock::packet::{PacketHeader, HDR_LEN};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::epoll::EventSet;

const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
/// Host ports with a listener (guest connections to them succeed).
const HOST_PORTS: [u32; 2] = [1000, 1001];
/// Most host-side streams the harness keeps.
const MAX_STREAMS: usize = 16;

struct Host {
    dir: PathBuf,
    listeners: Vec<UnixListener>,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("brig-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let listeners = HOST_PORTS
            .iter()
            .map(|p| {
                let l = UnixListener::bind(dir.join(format!("v.sock_{p}"))).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Host { dir, listeners }
    })
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(b)
    }
}

fuzz_target!(|data: &[u8]| {
    let host = host();
    let uds = host.dir.join("v.sock");
    let _ = std::fs::remove_file(&uds);
    let listener = UnixListener::bind(&uds).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut backend = UnixBackend::new(GUEST_CID, uds.clone(), listener);
    let mut streams: Vec<UnixStream> = Vec::new();
    let mut now = Instant::now();
    let mut input = Input(data);
    let mut out = Vec::new();
    while let Some(tag) = input.byte() {
        match tag % 7 {
            0 => {
                let Some(flags) = input.byte() else { break };
                let Some(raw) = input.bytes(HDR_LEN) else {
                    break;
                };
                let mut hdr = PacketHeader::from_bytes(raw.try_into().unwrap());
                if flags & 1 != 0 {
                    hdr.src_cid = GUEST_CID;
                    hdr.dst_cid = HOST_CID;
                }
                if flags & 2 != 0 {
                    hdr.dst_port = HOST_PORTS[usize::from(flags >> 7)];
                }
                if flags & 4 != 0 {
                    hdr.type_ = 1; // stream
                    hdr.op = u16::from(flags >> 3 & 7);
                }
                let len = usize::from(input.byte().unwrap_or(0));
                let payload = input.bytes(len.min(input.0.len())).unwrap_or_default();
                if flags & 4 != 0 {
                    hdr.len = payload.len() as u32;
                }
                backend.guest_packet(&hdr, payload);
            }
            1 => {
                let cap = usize::from(input.byte().unwrap_or(0)) * 64;
                for _ in 0..16 {
                    if !backend.has_rx() {
                        break;
                    }
                    let Some(hdr) = backend.next_rx(cap, &mut out) else {
                        break;
                    };
                    assert_eq!(hdr.src_cid, HOST_CID, "{hdr:?}");
                    assert_eq!(hdr.dst_cid, GUEST_CID, "{hdr:?}");
                    assert!(
                        out.len() <= cap,
                        "{} payload bytes for a {cap}-byte buffer",
                        out.len()
                    );
                    assert_eq!(hdr.len as usize, out.len(), "{hdr:?}");
                }
            }
            2 => {
                let port = input.byte().unwrap_or(0);
                if streams.len() < MAX_STREAMS {
                    if let Ok(mut s) = UnixStream::connect(&uds) {
                        s.set_nonblocking(true).unwrap();
                        let _ = write!(s, "CONNECT {port}\n");
                        streams.push(s);
                    }
                }
                backend.accept();
            }
            3 => {
                let (Some(i), Some(n)) = (input.byte(), input.byte()) else {
                    break;
                };
                if let Some(s) = streams.get_mut(usize::from(i) % MAX_STREAMS) {
                    let _ = s.write(&vec![b'x'; usize::from(n)]);
                }
            }
            4 => {
                let Some(i) = input.byte() else { break };
                let i = usize::from(i) % MAX_STREAMS;
                if i < streams.len() {
                    if i % 2 == 0 {
                        let _ = streams[i].shutdown(std::net::Shutdown::Write);
                    } else {
                        streams.remove(i);
                    }
                }
            }
            5 => {
                now += Duration::from_secs(u64::from(input.byte().unwrap_or(0)));
                backend.expire(now);
            }
            _ => backend.reset(),
        }
        // What the event loop would report for each host stream.
        for fd in backend.host_fds() {
            backend.host_event(fd, EventSet::IN | EventSet::OUT);
        }
        for l in &host.listeners {
            while streams.len() < MAX_STREAMS {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(true).unwrap();
                        streams.push(s);
                    }
                    Err(_) => break,
                }
            }
        }
    }
});

//! A gibibyte each way through a guest's NIC, with checksum and segmentation offloads on and
//! off (issue 9): the host sends it to the guest, the guest sends every byte straight back
//! (`tcp-relay`, a static program of this crate copied into the root filesystem), and the
//! host compares what came back, byte for byte, with what it sent. The bytes are a
//! pseudo-random sequence that both ends of the host generate as they go, so nothing is
//! hashed or held in memory, and the guest only moves bytes: under the lab's emulation busybox
//! `nc` moves a few hundred KiB/s, and hashing in the guest a few MiB/s.
//!
//! `BRIG_E2E_NET_MIB` sets the size (default 1024 MiB). In the lab a gibibyte takes about
//! 2 minutes with offloads and 5 without; tests/e2e/run-all.sh gives these tests twice the
//! usual time.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Instant;

use brig_e2e::net::VethNetns;
use brig_e2e::{brig, busybox_rootfs, stdout_of};

/// Bytes per write and per comparison.
const CHUNK: usize = 1 << 16;

fn rootfs() -> &'static std::path::Path {
    static ROOTFS: OnceLock<std::path::PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("brig-e2e-bulk-rootfs-{}", std::process::id()));
        let root = busybox_rootfs(&dir);
        std::fs::copy(env!("CARGO_BIN_EXE_tcp-relay"), root.join("tcp-relay")).unwrap();
        root
    })
}

/// Deterministic, incompressible bytes (xorshift64*), made a chunk at a time, so that a
/// gibibyte needs no gibibyte of memory.
struct Pattern(u64);

impl Pattern {
    fn new() -> Pattern {
        Pattern(0x6272_6967_6e65_7430)
    }

    /// Fill `buf` (a multiple of 8 bytes long) with the next bytes.
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            let x = &mut self.0;
            *x ^= *x >> 12;
            *x ^= *x << 25;
            *x ^= *x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
    }
}

/// Send `BRIG_E2E_NET_MIB` MiB through a guest whose NIC offers offloads or not, and check
/// that every byte came back unchanged.
fn round_trip(offload: bool) {
    let mib: usize = std::env::var("BRIG_E2E_NET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let test = if offload {
        "net-bulk-on"
    } else {
        "net-bulk-off"
    };
    let pid = std::process::id();
    // A subnet of its own, so that the two tests may run at once.
    let subnet = if offload { "10.99.11" } else { "10.99.12" };
    let host = format!("{subnet}.1");
    let ns = VethNetns::new(&format!("brig-bulk-{pid}-{offload}"), subnet);
    let sender = TcpListener::bind((host.as_str(), 0)).unwrap();
    let send_port = sender.local_addr().unwrap().port();
    let receiver = TcpListener::bind((host.as_str(), 0)).unwrap();
    let recv_port = receiver.local_addr().unwrap().port();
    let sending = std::thread::spawn(move || {
        let (mut s, _) = sender.accept().unwrap();
        let started = Instant::now();
        let mut pattern = Pattern::new();
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..(mib << 20) / CHUNK {
            pattern.fill(&mut buf);
            s.write_all(&buf).unwrap();
        }
        started.elapsed()
    });
    let receiving = std::thread::spawn(move || {
        let (mut s, _) = receiver.accept().unwrap();
        let started = Instant::now();
        let mut pattern = Pattern::new();
        let mut want = vec![0u8; CHUNK];
        let mut used = CHUNK;
        let mut buf = vec![0u8; CHUNK];
        let mut n = 0usize;
        let mut first_difference = None;
        loop {
            let got = s.read(&mut buf).unwrap();
            if got == 0 {
                break;
            }
            let mut at = 0;
            while at < got && first_difference.is_none() {
                if used == CHUNK {
                    pattern.fill(&mut want);
                    used = 0;
                }
                let k = (CHUNK - used).min(got - at);
                if let Some(i) = (0..k).find(|&i| buf[at + i] != want[used + i]) {
                    first_difference = Some(n + at + i);
                }
                used += k;
                at += k;
            }
            n += got;
        }
        (n, first_difference, started.elapsed())
    });
    let config = std::env::temp_dir().join(format!("{test}-{pid}.toml"));
    std::fs::write(&config, format!("net_offload = {offload}\n")).unwrap();
    let out = brig(test)
        .env("BRIG_CONFIG", &config)
        .args(["run", "--rm", "--memory", "256M", "--network"])
        .arg(ns.network_arg())
        .arg(rootfs())
        .args([
            "/tcp-relay",
            &format!("{host}:{send_port}"),
            &format!("{host}:{recv_port}"),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    drop(ns);
    stdout_of(out, &format!("bulk transfer, offload {offload}"));
    let in_time = sending.join().unwrap();
    let (n, first_difference, out_time) = receiving.join().unwrap();
    assert_eq!(
        first_difference, None,
        "offload {offload}: the bytes that came back through the guest differ from those sent from this offset on"
    );
    assert_eq!(
        n,
        mib << 20,
        "offload {offload}: the host sent {mib} MiB through the guest and got {n} bytes back"
    );
    eprintln!(
        "offload {offload}: {mib} MiB host → guest → host, sent in {in_time:?}, back in {out_time:?}"
    );
}

#[test]
fn a_gibibyte_crosses_the_nic_intact_both_ways_with_offloads() {
    round_trip(true);
}

#[test]
fn a_gibibyte_crosses_the_nic_intact_both_ways_without_offloads() {
    round_trip(false);
}

//! A static test program copied into container root filesystems by the end-to-end tests:
//! `tcp-relay FROM TO` connects to both addresses (`IP:PORT`) and copies every byte read from
//! FROM to TO until FROM ends, then closes TO. The bulk-data test sends a gibibyte through the
//! guest with it: busybox's `nc` moves a few hundred KiB/s under the lab's emulation, in 1 KiB
//! reads, where this moves what the NIC can (64 KiB at a time).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [from, to] = args.as_slice() else {
        eprintln!("usage: tcp-relay FROM_IP:PORT TO_IP:PORT");
        return ExitCode::from(2);
    };
    match relay(from, to) {
        Ok(n) => {
            eprintln!("tcp-relay: {n} bytes from {from} to {to}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tcp-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn relay(from: &str, to: &str) -> std::io::Result<u64> {
    let connect = |addr: &str| {
        TcpStream::connect(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {addr}: {e}")))
    };
    let mut input = connect(from)?;
    let mut output = connect(to)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        output.write_all(&buf[..n])?;
        total += n as u64;
    }
    output.shutdown(std::net::Shutdown::Write)?;
    // Wait for the other end to close, so that every byte is delivered before we exit.
    let _ = output.read(&mut buf);
    Ok(total)
}

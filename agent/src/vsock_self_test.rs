//! `VsockSelfTest`: a guest-initiated connection to the host that moves bulk data both ways.
//!
//! The core, [`exchange`], works on any stream pair so it is tested with Unix sockets; the
//! vsock part only opens the connection.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use brig_protocols::vsock_self_test::{Pattern, MAX_SEND_BYTES};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The host's vsock CID.
pub const HOST_CID: u32 = 2;

/// Bytes moved per read or write.
const CHUNK: usize = 64 * 1024;

/// A connection that stalls this long in one read or write fails the test instead of hanging
/// the call forever.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the self-test connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// vsock CID 2 (the host), the requested port: the real thing.
    HostVsock,
    /// The Unix socket `<prefix>_<port>` (the VMM's hybrid-vsock naming), for tests on a host.
    UnixPrefix(String),
}

/// Why the self-test failed. Messages are shown to the host's user as they are.
#[derive(Debug, Error)]
pub enum SelfTestError {
    /// `send_bytes` above the limit.
    #[error("send_bytes {requested} is over the limit of {MAX_SEND_BYTES} bytes (64 MiB)")]
    TooLarge {
        /// What was asked.
        requested: u64,
    },
    /// The port cannot be used.
    #[error("port {0} is not a valid vsock port")]
    BadPort(u32),
    /// Could not connect.
    #[error("cannot connect to {target}: {source}")]
    Connect {
        /// Human-readable destination.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// Sending failed.
    #[error("sending to the host failed after {sent} bytes: {source}")]
    Send {
        /// Bytes sent before the failure.
        sent: u64,
        /// Why.
        source: io::Error,
    },
    /// Receiving failed.
    #[error("receiving from the host failed after {received} bytes: {source}")]
    Receive {
        /// Bytes received before the failure.
        received: u64,
        /// Why.
        source: io::Error,
    },
    /// The sending thread died (a bug).
    #[error("the sending thread panicked")]
    SenderPanicked,
}

/// What an exchange moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Bytes read before EOF.
    pub received_bytes: u64,
    /// SHA-256 of the bytes read.
    pub received_sha256: [u8; 32],
    /// SHA-256 of the bytes sent.
    pub sent_sha256: [u8; 32],
}

/// The write half of a stream that can signal end-of-data to the peer.
pub trait HalfClose: Write {
    /// Shuts down the write direction (the peer reads EOF).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl HalfClose for UnixStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// A connected stream socket of any family, used through its file descriptor.
#[derive(Debug)]
pub struct SocketStream(File);

impl SocketStream {
    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<SocketStream> {
        self.0.try_clone().map(SocketStream)
    }
}

impl Read for SocketStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for SocketStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HalfClose for SocketStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        socket::shutdown(self.0.as_raw_fd(), socket::Shutdown::Write).map_err(io::Error::from)
    }
}

/// Checks the request and runs the whole self-test.
pub fn run(target: &Target, port: u32, send_bytes: u64) -> Result<Report, SelfTestError> {
    if send_bytes > MAX_SEND_BYTES {
        return Err(SelfTestError::TooLarge {
            requested: send_bytes,
        });
    }
    // VMADDR_PORT_ANY (u32::MAX) means "any" and cannot be connected to.
    if port == u32::MAX {
        return Err(SelfTestError::BadPort(port));
    }
    match target {
        Target::HostVsock => {
            let stream = connect_vsock(HOST_CID, port)?;
            let writer = stream
                .try_clone()
                .map_err(|source| SelfTestError::Connect {
                    target: format!("vsock CID {HOST_CID} port {port}"),
                    source,
                })?;
            exchange(stream, writer, send_bytes)
        }
        Target::UnixPrefix(prefix) => {
            let path = format!("{prefix}_{port}");
            let connect_error = |source| SelfTestError::Connect {
                target: path.clone(),
                source,
            };
            let stream = UnixStream::connect(&path).map_err(connect_error)?;
            set_timeouts(&stream).map_err(connect_error)?;
            let writer = stream.try_clone().map_err(connect_error)?;
            exchange(stream, writer, send_bytes)
        }
    }
}

fn set_timeouts(stream: &UnixStream) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))
}

/// Opens a vsock stream connection (the kernel gives up on an unanswered connect after 2 s).
fn connect_vsock(cid: u32, port: u32) -> Result<SocketStream, SelfTestError> {
    let connect_error = |source: io::Error| SelfTestError::Connect {
        target: format!("vsock CID {cid} port {port}"),
        source,
    };
    let fd: OwnedFd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| connect_error(errno.into()))?;
    socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))
        .map_err(|errno| connect_error(errno.into()))?;
    let timeout =
        nix::sys::time::TimeVal::new(i64::try_from(IO_TIMEOUT.as_secs()).unwrap_or(i64::MAX), 0);
    socket::setsockopt(&fd, socket::sockopt::ReceiveTimeout, &timeout)
        .and_then(|()| socket::setsockopt(&fd, socket::sockopt::SendTimeout, &timeout))
        .map_err(|errno| connect_error(errno.into()))?;
    Ok(SocketStream(File::from(fd)))
}

/// Sends `send_bytes` bytes of the self-test pattern on `writer`, then shuts its write side;
/// meanwhile reads `reader` to EOF. Both directions hashed with SHA-256.
pub fn exchange<R, W>(
    mut reader: R,
    mut writer: W,
    send_bytes: u64,
) -> Result<Report, SelfTestError>
where
    R: Read,
    W: HalfClose + Send,
{
    std::thread::scope(|scope| {
        let sender = scope.spawn(move || send_pattern(&mut writer, send_bytes));
        let received = receive_all(&mut reader);
        let sent = sender.join().map_err(|_| SelfTestError::SenderPanicked)?;
        // A send error usually explains a receive error (or vice versa); report the send first.
        let sent_sha256 = sent?;
        let (received_bytes, received_sha256) = received?;
        Ok(Report {
            received_bytes,
            received_sha256,
            sent_sha256,
        })
    })
}

fn send_pattern<W: HalfClose>(writer: &mut W, send_bytes: u64) -> Result<[u8; 32], SelfTestError> {
    let mut pattern = Pattern::new();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent: u64 = 0;
    while sent < send_bytes {
        let n = usize::try_from(send_bytes - sent).map_or(CHUNK, |left| left.min(CHUNK));
        let chunk = &mut buf[..n];
        pattern.fill(chunk);
        hasher.update(&*chunk);
        writer
            .write_all(chunk)
            .map_err(|source| SelfTestError::Send { sent, source })?;
        sent += n as u64;
    }
    writer
        .flush()
        .and_then(|()| writer.shutdown_write())
        .map_err(|source| SelfTestError::Send { sent, source })?;
    Ok(hasher.finalize().into())
}

fn receive_all<R: Read>(reader: &mut R) -> Result<(u64, [u8; 32]), SelfTestError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut received: u64 = 0;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok((received, hasher.finalize().into())),
            Ok(n) => {
                hasher.update(&buf[..n]);
                received += n as u64;
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(SelfTestError::Receive { received, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn pattern_bytes(n: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; n];
        Pattern::new().fill(&mut bytes);
        bytes
    }

    fn sha256(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// The host side: reads everything the agent sends, and sends `reply`.
    fn host(mut stream: UnixStream, reply: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut writer = stream.try_clone().unwrap();
            let send = std::thread::spawn(move || {
                writer.write_all(&reply).unwrap();
                writer.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut got = Vec::new();
            stream.read_to_end(&mut got).unwrap();
            send.join().unwrap();
            got
        })
    }

    #[test]
    fn moves_megabytes_both_ways_and_hashes_them() {
        let (agent, host_end) = UnixStream::pair().unwrap();
        let from_host: Vec<u8> = (0..3_000_001u32).map(|i| (i % 251) as u8).collect();
        let host = host(host_end, from_host.clone());

        let writer = agent.try_clone().unwrap();
        let report = exchange(agent, writer, 5_000_003).unwrap();

        let got = host.join().unwrap();
        assert_eq!(got, pattern_bytes(5_000_003));
        assert_eq!(report.sent_sha256, sha256(&got));
        assert_eq!(report.received_bytes, from_host.len() as u64);
        assert_eq!(report.received_sha256, sha256(&from_host));
    }

    #[test]
    fn zero_bytes_each_way() {
        let (agent, host_end) = UnixStream::pair().unwrap();
        let host = host(host_end, Vec::new());
        let writer = agent.try_clone().unwrap();
        let report = exchange(agent, writer, 0).unwrap();
        assert!(host.join().unwrap().is_empty());
        assert_eq!(report.received_bytes, 0);
        assert_eq!(report.received_sha256, sha256(b""));
        assert_eq!(report.sent_sha256, sha256(b""));
    }

    #[test]
    fn refuses_more_than_64_mib() {
        let err = run(
            &Target::UnixPrefix("/nonexistent".into()),
            5000,
            MAX_SEND_BYTES + 1,
        )
        .unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }

    #[test]
    fn connection_refused_is_a_readable_error() {
        let dir = std::env::temp_dir().join(format!("brig-selftest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prefix = dir.join("none").display().to_string();
        let err = run(&Target::UnixPrefix(prefix.clone()), 77, 10).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot connect to {prefix}_77")),
            "{err}"
        );
    }

    #[test]
    fn connects_to_the_hybrid_vsock_path() {
        let dir = std::env::temp_dir().join(format!("brig-selftest-uds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prefix = dir.join("vsock.sock").display().to_string();
        let path = format!("{prefix}_5001");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let host_thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            host(stream, b"hello agent".to_vec()).join().unwrap()
        });
        let report = run(&Target::UnixPrefix(prefix), 5001, 1000).unwrap();
        assert_eq!(host_thread.join().unwrap(), pattern_bytes(1000));
        assert_eq!(report.received_bytes, 11);
        assert_eq!(report.received_sha256, sha256(b"hello agent"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

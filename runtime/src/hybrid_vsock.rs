//! The host side of hybrid vsock: reaching a guest port through the VMM's Unix socket.
//!
//! The host connects to the VMM's socket and writes `CONNECT <port>\n`; the VMM answers
//! `OK <host port>\n` once the guest accepted, or closes the connection if nobody listens.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest acknowledgement line we accept from the VMM.
const ACK_MAX: usize = 32;

/// Errors reaching a guest port.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The VMM's socket cannot be reached (not created yet, or the VMM is gone).
    #[error("cannot reach the VMM's vsock socket {path}: {source}")]
    Socket {
        path: String,
        source: std::io::Error,
    },
    /// The guest refused or nobody listens on that port (yet).
    #[error("guest vsock port {0} refused the connection (nothing listening yet?)")]
    Refused(u32),
    /// The VMM answered something that is not `OK <port>`.
    #[error("the VMM answered {0:?} instead of OK <port>")]
    BadAck(String),
    /// No answer in time.
    #[error("no answer from guest vsock port {0} in time")]
    Timeout(u32),
}

/// Connect to guest vsock `port` through the VMM socket at `uds`.
pub async fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ConnectError> {
    let attempt = async {
        let mut stream = UnixStream::connect(uds)
            .await
            .map_err(|source| ConnectError::Socket {
                path: uds.display().to_string(),
                source,
            })?;
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|_| ConnectError::Refused(port))?;
        // Read the acknowledgement one byte at a time: nothing after the newline may be
        // consumed, it belongs to the protocol that runs on the stream.
        let mut line = Vec::with_capacity(ACK_MAX);
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => return Err(ConnectError::Refused(port)),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() >= ACK_MAX => {
                    return Err(ConnectError::BadAck(
                        String::from_utf8_lossy(&line).into_owned(),
                    ))
                }
                Ok(_) => line.push(byte[0]),
            }
        }
        parse_ack(&line)?;
        Ok(stream)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::Timeout(port))?
}

/// Where a host listener for guest-initiated connections to host `port` must be, next to the
/// VMM's socket `uds`: `<uds>_<port>`.
pub fn listener_path(uds: &Path, port: u32) -> PathBuf {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Check an `OK <port>` acknowledgement (without the newline) and return the host port.
pub fn parse_ack(line: &[u8]) -> Result<u32, ConnectError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| ConnectError::BadAck(String::from_utf8_lossy(line).into_owned()))?;
    text.strip_prefix("OK ")
        // Decimal digits only: `parse` alone would take a sign too.
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(|| ConnectError::BadAck(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_checked() {
        assert_eq!(parse_ack(b"OK 1073741824").unwrap(), 1 << 30);
        assert!(parse_ack(b"OK").is_err());
        assert!(parse_ack(b"NO 12").is_err());
        assert!(parse_ack(b"OK 12x").is_err());
        assert!(parse_ack(b"OK +12").is_err());
        assert!(parse_ack(&[0xff, 0xfe]).is_err());
    }

    #[tokio::test]
    async fn connect_speaks_the_handshake_and_keeps_following_bytes() {
        let dir = std::env::temp_dir().join(format!("brig-hv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 77\nhello").await.unwrap();
        });
        let mut stream = connect(&path, 1024, Duration::from_secs(5)).await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello");
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_closed_connection_is_a_refusal() {
        let dir = std::env::temp_dir().join(format!("brig-hv-rst-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        });
        let err = connect(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Refused(1024)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

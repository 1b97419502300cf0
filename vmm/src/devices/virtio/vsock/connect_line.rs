//! The hybrid-vsock handshake line a host process sends after connecting to the device's
//! Unix socket: `CONNECT <port>\n`.

/// Longest handshake line we read, newline included (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_CONNECT_LINE: usize = 32;

/// Why a handshake line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectLineError {
    #[error("the handshake line is longer than {MAX_CONNECT_LINE} bytes")]
    TooLong,
    #[error("the handshake line does not end with a newline")]
    MissingNewline,
    #[error("the handshake line does not start with `CONNECT `; send `CONNECT <port>\\n`")]
    NotConnect,
    #[error("the vsock port in the handshake line is not a decimal number")]
    BadPort,
    #[error("the vsock port in the handshake line does not fit in 32 bits")]
    PortOutOfRange,
}

/// Parse one complete handshake line, `CONNECT <port>\n` (a `\r` before the newline and
/// extra spaces between the words are tolerated), and return the guest vsock port.
///
/// The input is the whole line including its newline and nothing after it. Pure and bounded:
/// suitable as a fuzz target.
///
/// ```
/// use brig_vmm::devices::virtio::vsock::parse_connect_line;
/// assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Ok(1024));
/// assert!(parse_connect_line(b"CONNECT x\n").is_err());
/// ```
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    if line.len() > MAX_CONNECT_LINE {
        return Err(ConnectLineError::TooLong);
    }
    let line = line
        .strip_suffix(b"\n")
        .ok_or(ConnectLineError::MissingNewline)?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line
        .strip_prefix(b"CONNECT ")
        .ok_or(ConnectLineError::NotConnect)?;
    let digits = rest.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ConnectLineError::BadPort);
    }
    // At most MAX_CONNECT_LINE digits: accumulate in u64 with checks, no overflow possible.
    let mut port: u64 = 0;
    for d in digits {
        port = port
            .checked_mul(10)
            .and_then(|p| p.checked_add(u64::from(d - b'0')))
            .ok_or(ConnectLineError::PortOutOfRange)?;
        if port > u64::from(u32::MAX) {
            return Err(ConnectLineError::PortOutOfRange);
        }
    }
    u32::try_from(port).map_err(|_| ConnectLineError::PortOutOfRange)
}

/// A host connection that has not finished its handshake line yet.
#[derive(Debug, Default)]
pub struct LineBuffer {
    buf: [u8; MAX_CONNECT_LINE],
    len: usize,
}

/// What the bytes read so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum LineStatus {
    /// No newline yet; read more.
    Incomplete,
    /// A full line: the port, and bytes the host sent after the newline (data for the guest).
    Complete { port: u32, rest: Vec<u8> },
}

impl LineBuffer {
    /// Where the next read should go (empty when the buffer is full).
    pub fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    /// `n` bytes were read into `spare()`; look for the end of the line.
    pub fn filled(&mut self, n: usize) -> Result<LineStatus, ConnectLineError> {
        self.len = (self.len + n).min(MAX_CONNECT_LINE);
        let bytes = &self.buf[..self.len];
        match bytes.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let port = parse_connect_line(&bytes[..=end])?;
                Ok(LineStatus::Complete {
                    port,
                    rest: bytes[end + 1..].to_vec(),
                })
            }
            None if self.len >= MAX_CONNECT_LINE => Err(ConnectLineError::TooLong),
            None => Ok(LineStatus::Incomplete),
        }
    }

    /// The host closed its end before sending a full line.
    pub fn eof(&self) -> ConnectLineError {
        ConnectLineError::MissingNewline
    }
}

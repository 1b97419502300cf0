//! The VMM's own log (its stderr), capped.
//!
//! What `brig-vmm` says goes to its stderr, which the runtime points at `vmm.log` in the
//! sandbox directory (under `/run`, tmpfs). The warnings a guest can trigger are
//! rate-limited ([`crate::guest_warn`]), but a VM that lives for weeks still adds up, so when
//! stderr is a regular file the VMM's log writer keeps it under a cap the way the console
//! file is kept ([`crate::console_file`]): when a line would pass the cap, the newest half
//! is moved to the front and the file is cut there, so the end of the log — what the
//! runtime quotes in errors — is always kept.
//!
//! Other writers of stderr (the SIGSYS handler, a panic message, `main`'s last words) write
//! at the offset of the file description that fd 2 and this writer share. The writer
//! measures the file (not a count of its own) before each line and leaves the offset at the
//! end after it, so their lines land at the end and count against the cap too.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};

use crate::console_file::{keep_newest, kept_part, MIN_LIMIT};

/// Default cap of the VMM's log.
pub const DEFAULT_LIMIT: u64 = 1024 * 1024;

/// A log file shared with stderr that never grows past its limit (see the module's
/// documentation).
pub struct CappedLog {
    file: File,
    limit: u64,
}

impl CappedLog {
    /// Cap `file` (opened read-write, without `O_APPEND`) at `limit` bytes (at least
    /// [`MIN_LIMIT`]). Clones of its descriptor (fd 2) may write to it as well.
    pub fn new(file: File, limit: u64) -> Self {
        Self {
            file,
            limit: limit.max(MIN_LIMIT),
        }
    }

    /// Cap the file behind this process's stderr at `limit` bytes. `Ok(None)` when stderr
    /// is not a regular file (a terminal, a pipe, /dev/null: nothing to cap). A file opened
    /// write-only or for appending (`2>file`, `2>>file`) is reopened read-write in its place
    /// on fd 2, because the cut reads the file back and writes at its front.
    pub fn for_stderr(limit: u64) -> io::Result<Option<Self>> {
        let stderr = io::stderr();
        let mode = fstat(stderr.as_fd()).map_err(io::Error::from)?.st_mode;
        if SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Ok(None);
        }
        let flags = OFlag::from_bits_truncate(
            fcntl(stderr.as_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?,
        );
        if flags & OFlag::O_ACCMODE != OFlag::O_RDWR || flags.contains(OFlag::O_APPEND) {
            let reopened = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/proc/self/fd/2")?;
            nix::unistd::dup2_stderr(&reopened).map_err(io::Error::from)?;
        }
        let mut file = File::from(stderr.as_fd().try_clone_to_owned()?);
        // A reopened file starts at offset 0: later writes of stderr belong at its end.
        file.seek(SeekFrom::End(0))?;
        Ok(Some(Self::new(file, limit)))
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let part = kept_part(buf, self.limit);
        let incoming = part.len() as u64;
        // The file's length, not a count of our own: other writers of stderr add to it.
        let len = self.file.seek(SeekFrom::End(0))?;
        if len + incoming > self.limit {
            let kept = keep_newest(&self.file, len, self.limit, incoming)?;
            self.file.seek(SeekFrom::Start(kept))?;
        }
        // At the shared offset, which is the end of the file.
        self.file.write_all(part)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_file(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("brig-vmm-log-{}-{name}", std::process::id()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    #[test]
    fn a_flood_of_warnings_stays_under_the_cap_and_the_newest_survive() {
        let (path, file) = log_file("flood");
        let mut log = CappedLog::new(file, MIN_LIMIT);
        for i in 0..100_000 {
            writeln!(log, "WARN vsock: dropping a malformed TX packet {i}").unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= MIN_LIMIT);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("packet 99999\n"),
            "{}",
            &text[text.len() - 60..]
        );
        // What is kept is a contiguous run of the newest lines.
        let numbers: Vec<u32> = text
            .lines()
            .skip(1)
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert!(numbers.len() > 100, "{} lines kept", numbers.len());
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn other_writers_of_stderr_land_at_the_end_and_count_against_the_cap() {
        let (path, file) = log_file("shared");
        // A clone shares the file description, and so the offset, as fd 2 does.
        let mut raw = file.try_clone().unwrap();
        let mut log = CappedLog::new(file, MIN_LIMIT);
        writeln!(log, "first").unwrap();
        writeln!(
            raw,
            "brig-vmm: seccomp: the vCPU thread made system call 110"
        )
        .unwrap();
        writeln!(log, "third").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "first\nbrig-vmm: seccomp: the vCPU thread made system call 110\nthird\n"
        );
        // A big raw write pushes the file past the cap; the next line cuts it back under.
        raw.write_all(&vec![b'r'; 2 * MIN_LIMIT as usize]).unwrap();
        writeln!(log, "after").unwrap();
        let text = std::fs::read(&path).unwrap();
        assert!(text.len() as u64 <= MIN_LIMIT, "{} bytes", text.len());
        assert!(text.ends_with(b"rrrrafter\n"));
        // And a raw write after the cut still lands at the end.
        writeln!(raw, "last words").unwrap();
        assert!(std::fs::read(&path)
            .unwrap()
            .ends_with(b"after\nlast words\n"));
        std::fs::remove_file(path).unwrap();
    }
}

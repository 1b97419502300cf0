//! The guest console's file, capped.
//!
//! The guest decides how much it prints, and the console file lives on the host (under
//! `/run`, tmpfs, for the runtime): unbounded, a guest could fill the host's memory. A
//! [`CappedFile`] never grows past its limit: when a write would pass it, the newest half
//! of the limit is moved to the front and the file is cut there, so the end of the log —
//! what errors quote — is always kept.
//!
//! It is written from vCPU threads (the serial port), so it uses only `pread64`, `pwrite64`
//! and `ftruncate` on a file opened before the filters are installed.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// Default cap of the console file.
pub const DEFAULT_LIMIT: u64 = 1024 * 1024;

/// Smallest cap accepted: room for a kernel panic's lines.
pub const MIN_LIMIT: u64 = 16 * 1024;

/// A file that keeps only its newest `limit` bytes (see the module's documentation).
pub struct CappedFile {
    file: File,
    limit: u64,
    len: u64,
}

impl CappedFile {
    /// Wrap `file`, writing after what it already holds; its existing content counts.
    pub fn new(file: File, limit: u64) -> io::Result<Self> {
        let limit = limit.max(MIN_LIMIT);
        let len = file.metadata()?.len();
        let mut capped = Self { file, limit, len };
        if capped.len > limit {
            capped.cut(0)?;
        }
        Ok(capped)
    }

    /// The file's length now.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Make room for `incoming` more bytes (see [`keep_newest`]).
    fn cut(&mut self, incoming: u64) -> io::Result<()> {
        self.len = keep_newest(&self.file, self.len, self.limit, incoming)?;
        Ok(())
    }
}

/// Make room in `file` (`len` bytes long, capped at `limit`) for `incoming` more bytes: move
/// the newest half of the limit (less what comes in) to the front and cut the file there.
/// Returns the new length. Uses `pread64`, `pwrite64` and `ftruncate` only.
pub fn keep_newest(file: &File, len: u64, limit: u64, incoming: u64) -> io::Result<u64> {
    let keep = (limit / 2).saturating_sub(incoming).min(len);
    let start = len - keep;
    let keep_len = usize::try_from(keep).map_err(|_| io::Error::other("log cap too large"))?;
    let mut kept = vec![0; keep_len];
    file.read_exact_at(&mut kept, start)?;
    file.write_all_at(&kept, 0)?;
    file.set_len(keep)?;
    Ok(keep)
}

/// The part of one write worth keeping in a file capped at `limit`: all of it, or its end
/// when it is more than half the cap.
pub fn kept_part(buf: &[u8], limit: u64) -> &[u8] {
    let half = usize::try_from(limit / 2).unwrap_or(usize::MAX);
    if buf.len() > half {
        &buf[buf.len() - half..]
    } else {
        buf
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // More than half the cap at once: only its end is worth keeping.
        let buf_kept = kept_part(buf, self.limit);
        let incoming = buf_kept.len() as u64;
        if self.len + incoming > self.limit {
            self.cut(incoming)?;
        }
        self.file.write_all_at(buf_kept, self.len)?;
        self.len += incoming;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("brig-console-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_flood_stays_under_the_cap_and_the_newest_lines_survive() {
        let path = temp("flood");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut log = CappedFile::new(file, MIN_LIMIT).unwrap();
        for i in 0..100_000 {
            writeln!(log, "line {i}").unwrap();
            assert!(log.len() <= MIN_LIMIT);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 <= MIN_LIMIT);
        assert!(
            text.ends_with("line 99999\n"),
            "{}",
            &text[text.len() - 40..]
        );
        // What is kept is a contiguous run of the newest lines.
        let lines: Vec<&str> = text.lines().skip(1).collect();
        let first: u32 = lines[0].trim_start_matches("line ").parse().unwrap();
        for (n, line) in lines.iter().enumerate() {
            assert_eq!(*line, format!("line {}", first + n as u32));
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn one_huge_write_keeps_its_end_and_an_old_big_file_is_cut_at_open() {
        let path = temp("huge");
        std::fs::write(&path, vec![b'o'; 3 * MIN_LIMIT as usize]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut log = CappedFile::new(file, MIN_LIMIT).unwrap();
        assert!(log.len() <= MIN_LIMIT / 2);
        let mut big = vec![b'x'; 5 * MIN_LIMIT as usize];
        big.extend_from_slice(b"the end\n");
        assert_eq!(log.write(&big).unwrap(), big.len());
        let text = std::fs::read(&path).unwrap();
        assert!(text.len() as u64 <= MIN_LIMIT);
        assert!(text.ends_with(b"xthe end\n"));
        std::fs::remove_file(path).unwrap();
    }
}

//! Facts about the guest for `Version`: kernel release, online CPUs, memory, uptime.
//! The parsers are pure and take the file contents; the readers add the paths.

use std::fs;
use thiserror::Error;

const OSRELEASE: &str = "/proc/sys/kernel/osrelease";
const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";
const MEMINFO: &str = "/proc/meminfo";
const UPTIME: &str = "/proc/uptime";

/// Largest CPU number accepted in a CPU list (the kernel's NR_CPUS limit is 8192).
const MAX_CPU_INDEX: u32 = 8191;

/// A guest fact could not be read.
#[derive(Debug, Error)]
pub enum GuestInfoError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// Which file.
        path: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The file's contents were not as expected.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// Which file.
        path: &'static str,
        /// What was wrong.
        reason: String,
    },
}

fn read(path: &'static str) -> Result<String, GuestInfoError> {
    fs::read_to_string(path).map_err(|source| GuestInfoError::Read { path, source })
}

fn parse_error(path: &'static str) -> impl FnOnce(String) -> GuestInfoError {
    move |reason| GuestInfoError::Parse { path, reason }
}

/// The kernel release (`uname -r`).
pub fn kernel_release() -> Result<String, GuestInfoError> {
    Ok(read(OSRELEASE)?.trim().to_string())
}

/// The number of online CPUs.
pub fn cpus_online() -> Result<u32, GuestInfoError> {
    parse_cpu_list(&read(CPU_ONLINE)?).map_err(parse_error(CPU_ONLINE))
}

/// MemTotal in KiB.
pub fn mem_total_kib() -> Result<u64, GuestInfoError> {
    parse_meminfo_total_kib(&read(MEMINFO)?).map_err(parse_error(MEMINFO))
}

/// Time since boot in milliseconds.
pub fn uptime_ms() -> Result<u64, GuestInfoError> {
    parse_uptime_ms(&read(UPTIME)?).map_err(parse_error(UPTIME))
}

/// Counts the CPUs in a kernel CPU list such as `0-1,3` (see cpuset(7) "List format").
pub fn parse_cpu_list(text: &str) -> Result<u32, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    let mut count: u32 = 0;
    for part in text.split(',') {
        let (start, end) = match part.split_once('-') {
            Some((start, end)) => (parse_cpu(start)?, parse_cpu(end)?),
            None => {
                let cpu = parse_cpu(part)?;
                (cpu, cpu)
            }
        };
        if end < start {
            return Err(format!("range {part:?} ends before it starts"));
        }
        count = count
            .checked_add(end - start + 1)
            .ok_or_else(|| "CPU count overflows".to_string())?;
    }
    Ok(count)
}

fn parse_cpu(text: &str) -> Result<u32, String> {
    let cpu: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a CPU number"))?;
    if cpu > MAX_CPU_INDEX {
        return Err(format!("CPU number {cpu} is larger than {MAX_CPU_INDEX}"));
    }
    Ok(cpu)
}

/// Finds `MemTotal:` in `/proc/meminfo` and returns it in KiB.
pub fn parse_meminfo_total_kib(text: &str) -> Result<u64, String> {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("MemTotal:") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let value: u64 = fields
            .next()
            .ok_or_else(|| "MemTotal has no value".to_string())?
            .parse()
            .map_err(|_| format!("MemTotal value in {line:?} is not a number"))?;
        return match fields.next() {
            Some("kB") | None => Ok(value),
            Some(unit) => Err(format!("MemTotal has unexpected unit {unit:?}")),
        };
    }
    Err("no MemTotal line".to_string())
}

/// Parses the first field of `/proc/uptime` (seconds with a decimal fraction) into milliseconds,
/// without floating point.
pub fn parse_uptime_ms(text: &str) -> Result<u64, String> {
    let first = text
        .split_whitespace()
        .next()
        .ok_or_else(|| "empty".to_string())?;
    let (seconds, fraction) = first.split_once('.').unwrap_or((first, ""));
    let bad = || format!("{first:?} is not a number of seconds");
    if seconds.is_empty() || !seconds.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let seconds: u64 = seconds.parse().map_err(|_| bad())?;
    // Milliseconds from the first three fraction digits, padded with zeros.
    let mut millis: u64 = 0;
    let mut digits = fraction.bytes();
    for _ in 0..3 {
        millis = millis * 10 + digits.next().map_or(0, |b| u64::from(b - b'0'));
    }
    seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(millis))
        .ok_or_else(|| format!("{first:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(parse_cpu_list("0\n"), Ok(1));
        assert_eq!(parse_cpu_list("0-1\n"), Ok(2));
        assert_eq!(parse_cpu_list("0-1,3"), Ok(3));
        assert_eq!(parse_cpu_list("0,2,4-7"), Ok(6));
        assert_eq!(parse_cpu_list(""), Ok(0));
    }

    #[test]
    fn rejects_bad_cpu_lists() {
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("0-").is_err());
        assert!(parse_cpu_list("0,,1").is_err());
        assert!(parse_cpu_list("0-4294967295").is_err());
    }

    #[test]
    fn reads_memtotal() {
        let meminfo = "MemTotal:         524288 kB\nMemFree:          400000 kB\n";
        assert_eq!(parse_meminfo_total_kib(meminfo), Ok(524_288));
        let later = "MemFree:  1 kB\nMemTotal:  2048 kB\n";
        assert_eq!(parse_meminfo_total_kib(later), Ok(2048));
    }

    #[test]
    fn rejects_bad_meminfo() {
        assert!(parse_meminfo_total_kib("MemFree: 1 kB\n").is_err());
        assert!(parse_meminfo_total_kib("MemTotal: lots kB\n").is_err());
        assert!(parse_meminfo_total_kib("MemTotal:\n").is_err());
        assert!(parse_meminfo_total_kib("MemTotal: 1 MB\n").is_err());
        assert!(parse_meminfo_total_kib("").is_err());
    }

    #[test]
    fn reads_uptime() {
        assert_eq!(parse_uptime_ms("12.34 56.78\n"), Ok(12_340));
        assert_eq!(parse_uptime_ms("0.05 0.00"), Ok(50));
        assert_eq!(parse_uptime_ms("7 1"), Ok(7000));
        assert_eq!(parse_uptime_ms("1.23456 0"), Ok(1234));
    }

    #[test]
    fn rejects_bad_uptime() {
        assert!(parse_uptime_ms("").is_err());
        assert!(parse_uptime_ms("-1.0 0").is_err());
        assert!(parse_uptime_ms(".5 0").is_err());
        assert!(parse_uptime_ms("1.x 0").is_err());
        assert!(parse_uptime_ms("99999999999999999999.0 0").is_err());
    }

    #[test]
    fn reads_this_machine() {
        // The host's own /proc and /sys look like a guest's.
        assert!(!kernel_release().unwrap().is_empty());
        assert!(cpus_online().unwrap() >= 1);
        assert!(mem_total_kib().unwrap() > 0);
        assert!(uptime_ms().unwrap() > 0);
    }
}

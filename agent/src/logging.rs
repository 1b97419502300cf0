//! Console logging: plain lines on stderr (the serial console when PID 1), prefixed
//! `brig-agent: `. Quiet by default; `brig.log=debug` on the kernel command line shows more.
//!
//! Records from dependencies that use the `log` crate (ttrpc) go through the same filter, tagged
//! with their module, and are shown only at `debug`, except their errors.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

/// How much the agent prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Errors only (and the one "ready" line).
    Error = 0,
    /// Errors and warnings: the default.
    Warn = 1,
    /// Lifecycle events.
    Info = 2,
    /// Everything, including ttrpc's own logs.
    Debug = 3,
}

impl Level {
    /// Parses a `brig.log=` / `--log` value.
    pub fn parse(value: &str) -> Option<Level> {
        match value {
            "error" | "quiet" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" | "trace" => Some(Level::Debug),
            _ => None,
        }
    }

    fn from_u8(value: u8) -> Level {
        match value {
            0 => Level::Error,
            1 => Level::Warn,
            2 => Level::Info,
            _ => Level::Debug,
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Warn as u8);

/// Sets the level for the rest of the process's life.
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    log::set_max_level(if level == Level::Debug {
        log::LevelFilter::Trace
    } else {
        log::LevelFilter::Error
    });
}

/// Whether messages at `level` are printed.
pub fn enabled(level: Level) -> bool {
    level <= Level::from_u8(LEVEL.load(Ordering::Relaxed))
}

/// Writes one line to stderr. Errors writing to the console are ignored: there is nowhere
/// else to report them.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let mut line = String::with_capacity(128);
    line.push_str("brig-agent: ");
    // Formatting into a String cannot fail unless a Display impl lies; ignore that case.
    let _ = std::fmt::write(&mut line, args);
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Prints a line at the given level.
#[macro_export]
macro_rules! agent_log {
    ($level:expr, $($arg:tt)*) => {
        if $crate::logging::enabled($level) {
            $crate::logging::write_line(format_args!($($arg)*));
        }
    };
}

/// Prints an error line (always shown).
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::agent_log!($crate::logging::Level::Error, "error: {}", format_args!($($arg)*)) };
}

/// Prints a warning line.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::agent_log!($crate::logging::Level::Warn, "warning: {}", format_args!($($arg)*)) };
}

/// Prints an informational line.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::agent_log!($crate::logging::Level::Info, $($arg)*) };
}

/// Prints a debug line.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::agent_log!($crate::logging::Level::Debug, $($arg)*) };
}

/// Routes `log` records of dependencies into the console.
struct DependencyLogger;

impl log::Log for DependencyLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() == log::Level::Error || enabled(Level::Debug)
    }

    fn log(&self, record: &log::Record<'_>) {
        if log::Log::enabled(self, record.metadata()) {
            write_line(format_args!(
                "[{} {}] {}",
                record.level().as_str().to_ascii_lowercase(),
                record.target(),
                record.args()
            ));
        }
    }

    fn flush(&self) {}
}

static DEPENDENCY_LOGGER: DependencyLogger = DependencyLogger;

/// Installs the bridge for the `log` crate. Call once, early; later calls do nothing.
pub fn init(level: Level) {
    let _ = log::set_logger(&DEPENDENCY_LOGGER);
    set_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels() {
        assert_eq!(Level::parse("debug"), Some(Level::Debug));
        assert_eq!(Level::parse("quiet"), Some(Level::Error));
        assert_eq!(Level::parse("warn"), Some(Level::Warn));
        assert_eq!(Level::parse("loud"), None);
    }
}

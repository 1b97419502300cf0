//! Options of the agent: from the kernel command line (`brig.*` keys) when PID 1, from argv
//! when run by hand for debugging.

use crate::logging::Level;
use thiserror::Error;

/// Longest hostname Linux accepts (HOST_NAME_MAX).
const HOSTNAME_MAX: usize = 64;

/// Options read from the kernel command line (`/proc/cmdline`).
///
/// - `brig.log=error|warn|info|debug`: console verbosity (default `warn`: quiet).
/// - `brig.hostname=NAME`: the guest hostname (RFC 1123 characters, at most 64 bytes).
///
/// Other words are ignored; unknown `brig.*` keys and bad values are reported, not fatal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelOptions {
    /// `brig.log=`.
    pub log_level: Option<Level>,
    /// `brig.hostname=`.
    pub hostname: Option<String>,
    /// `brig.share=TAG`: the virtio-fs tag to mount at /run/brig/shared.
    pub share: Option<String>,
    /// Human-readable problems found while parsing, to log once logging is set up.
    pub problems: Vec<String>,
}

/// Parses the contents of `/proc/cmdline`.
pub fn parse_kernel_cmdline(cmdline: &str) -> KernelOptions {
    let mut options = KernelOptions::default();
    for word in split_cmdline(cmdline) {
        let Some(rest) = word.strip_prefix("brig.") else {
            continue;
        };
        let (key, value) = match rest.split_once('=') {
            Some((key, value)) => (key, value),
            None => (rest, ""),
        };
        match key {
            "log" => match Level::parse(value) {
                Some(level) => options.log_level = Some(level),
                None => options.problems.push(format!(
                    "ignoring brig.log={value:?}: expected error, warn, info or debug"
                )),
            },
            "hostname" => match validate_hostname(value) {
                Ok(()) => options.hostname = Some(value.to_string()),
                Err(err) => options
                    .problems
                    .push(format!("ignoring brig.hostname={value:?}: {err}")),
            },
            "share" if !value.is_empty() => options.share = Some(value.to_string()),
            _ => options
                .problems
                .push(format!("ignoring unknown kernel option brig.{key}")),
        }
    }
    options
}

/// Splits a kernel command line into words, honouring double quotes the way the kernel does
/// (`key="a b"` is one word, quotes removed).
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    for c in cmdline.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

/// Why a hostname was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HostnameError {
    /// Empty value.
    #[error("the hostname is empty")]
    Empty,
    /// Over HOST_NAME_MAX.
    #[error("the hostname is longer than {HOSTNAME_MAX} bytes")]
    TooLong,
    /// A character outside letters, digits, '-' and '.'.
    #[error("the hostname may contain only letters, digits, '-' and '.'")]
    BadCharacter,
}

/// Checks a hostname: 1..=64 bytes of ASCII letters, digits, '-' and '.'.
pub fn validate_hostname(name: &str) -> Result<(), HostnameError> {
    if name.is_empty() {
        return Err(HostnameError::Empty);
    }
    if name.len() > HOSTNAME_MAX {
        return Err(HostnameError::TooLong);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(HostnameError::BadCharacter);
    }
    Ok(())
}

/// What to do, from argv (only meaningful when not PID 1; as PID 1 argv comes from the kernel
/// and is ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print the version and exit.
    Version,
    /// Print usage and exit.
    Help,
    /// Serve the API.
    Serve(ServeOptions),
}

/// Options of a debugging run (not PID 1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServeOptions {
    /// ttrpc listen address (`unix:///path`, `vsock://-1:1024`); default the vsock port.
    pub listen: Option<String>,
    /// `--log LEVEL`.
    pub log_level: Option<Level>,
    /// `--self-test-uds PREFIX`: VsockSelfTest connects to the Unix socket `PREFIX_<port>`
    /// (the VMM's hybrid-vsock convention) instead of vsock CID 2. For tests on a host.
    pub self_test_uds: Option<String>,
    /// `--cgroup-root DIR`: parent of container cgroups (default /sys/fs/cgroup/brig when
    /// /sys/fs/cgroup is cgroup v2, else none).
    pub cgroup_root: Option<String>,
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
usage: brig-agent [--version] [--help]
       brig-agent [--listen ADDR] [--log LEVEL] [--self-test-uds PREFIX] [--cgroup-root DIR]

As PID 1 (the guest's /init) brig-agent ignores its arguments: it mounts the guest's
filesystems, reads brig.log= and brig.hostname= from /proc/cmdline and serves ttrpc on
vsock port 1024. Run by hand it skips mounts, hostname and reboot (debugging), and:
  --listen ADDR          ttrpc address, e.g. unix:///tmp/agent.sock (default vsock://-1:1024)
  --log LEVEL            error, warn (default), info or debug
  --self-test-uds PREFIX VsockSelfTest and container stdio connect to the Unix socket
                         PREFIX_<port>, not vsock
  --cgroup-root DIR      parent cgroup (v2) of containers (default /sys/fs/cgroup/brig if
                         cgroup v2 is mounted there; else containers run without cgroups)
";

/// Why argv was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ArgsError {
    /// An option that needs a value came last.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// A bad `--log` value.
    #[error("unknown log level {0:?}: expected error, warn, info or debug")]
    BadLevel(String),
    /// Anything else.
    #[error("unexpected argument {0:?} (see --help)")]
    Unexpected(String),
}

/// Parses argv without the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, ArgsError> {
    let mut serve = ServeOptions::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => {
                (name.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| ArgsError::MissingValue(name.to_string()))
        };
        match name.as_str() {
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--listen" => serve.listen = Some(value("--listen")?),
            "--log" => {
                let level = value("--log")?;
                serve.log_level = Some(Level::parse(&level).ok_or(ArgsError::BadLevel(level))?);
            }
            "--self-test-uds" => serve.self_test_uds = Some(value("--self-test-uds")?),
            "--cgroup-root" => serve.cgroup_root = Some(value("--cgroup-root")?),
            _ => return Err(ArgsError::Unexpected(arg)),
        }
    }
    Ok(Command::Serve(serve))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_brig_options_and_ignores_the_rest() {
        let options = parse_kernel_cmdline(
            "console=ttyS0 reboot=k panic=1 brig.log=debug brig.hostname=pod-1 brig.share=sb quiet\n",
        );
        assert_eq!(options.log_level, Some(Level::Debug));
        assert_eq!(options.hostname.as_deref(), Some("pod-1"));
        assert_eq!(options.share.as_deref(), Some("sb"));
        assert!(options.problems.is_empty(), "{:?}", options.problems);
    }

    #[test]
    fn defaults_when_nothing_is_given() {
        assert_eq!(parse_kernel_cmdline(""), KernelOptions::default());
        assert_eq!(
            parse_kernel_cmdline("console=ttyS0"),
            KernelOptions::default()
        );
    }

    #[test]
    fn bad_values_are_reported_not_fatal() {
        let options =
            parse_kernel_cmdline("brig.log=loud brig.hostname=a/b brig.colour=blue brig.log");
        assert_eq!(options.log_level, None);
        assert_eq!(options.hostname, None);
        assert_eq!(options.problems.len(), 4, "{:?}", options.problems);
    }

    #[test]
    fn later_values_win_and_quotes_are_honoured() {
        let options = parse_kernel_cmdline(r#"brig.log=info foo="a b c" brig.log="debug""#);
        assert_eq!(options.log_level, Some(Level::Debug));
        assert!(options.problems.is_empty());
    }

    #[test]
    fn hostname_rules() {
        assert_eq!(validate_hostname("sandbox-0.example"), Ok(()));
        assert_eq!(validate_hostname(""), Err(HostnameError::Empty));
        assert_eq!(
            validate_hostname(&"a".repeat(65)),
            Err(HostnameError::TooLong)
        );
        assert_eq!(validate_hostname("a b"), Err(HostnameError::BadCharacter));
        assert_eq!(validate_hostname("é"), Err(HostnameError::BadCharacter));
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_argv() {
        assert_eq!(parse_args(args(&["--version"])), Ok(Command::Version));
        assert_eq!(
            parse_args(args(&["--listen", "unix:///tmp/a.sock", "--log=debug"])),
            Ok(Command::Serve(ServeOptions {
                listen: Some("unix:///tmp/a.sock".into()),
                log_level: Some(Level::Debug),
                self_test_uds: None,
                cgroup_root: None,
            }))
        );
        assert_eq!(
            parse_args(args(&[])),
            Ok(Command::Serve(ServeOptions::default()))
        );
        assert_eq!(
            parse_args(args(&["--listen"])),
            Err(ArgsError::MissingValue("--listen".into()))
        );
        assert_eq!(
            parse_args(args(&["--log", "x"])),
            Err(ArgsError::BadLevel("x".into()))
        );
        assert_eq!(
            parse_args(args(&["serve"])),
            Err(ArgsError::Unexpected("serve".into()))
        );
    }
}

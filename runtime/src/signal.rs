//! Signal names as users and engines write them: `KILL`, `SIGKILL`, `kill`, `9`.

/// A signal that cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// A number outside 1–64.
    #[error("signal {0} is out of range (1-64)")]
    OutOfRange(i64),
    /// A name no signal has.
    #[error("unknown signal {0:?} (use a name such as TERM or KILL, or a number)")]
    Unknown(String),
}

/// Parse a signal name (with or without `SIG`, any case) or number.
pub fn parse_signal(s: &str) -> Result<i32, SignalError> {
    if let Ok(n) = s.parse::<i64>() {
        return match i32::try_from(n) {
            Ok(n) if (1..=64).contains(&n) => Ok(n),
            _ => Err(SignalError::OutOfRange(n)),
        };
    }
    let name = s.to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| SignalError::Unknown(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(matches!(parse_signal("NOPE"), Err(SignalError::Unknown(_))));
        assert!(matches!(parse_signal("0"), Err(SignalError::OutOfRange(0))));
        assert!(matches!(
            parse_signal("99999999999"),
            Err(SignalError::OutOfRange(_))
        ));
    }
}

//! The VMM's `OK <port>` acknowledgement of a host-initiated vsock connection: any bytes
//! give a port or an error, never a panic.
#![no_main]

use brig_runtime::hybrid_vsock::parse_ack;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(port) = parse_ack(data) {
        // Only ever from "OK " and the port's decimal digits (leading zeros allowed).
        let digits = data.strip_prefix(b"OK ").expect("the OK prefix");
        assert!(!digits.is_empty() && digits.iter().all(u8::is_ascii_digit));
        let value = std::str::from_utf8(digits).unwrap().parse::<u64>().unwrap();
        assert_eq!(value, u64::from(port));
    }
});

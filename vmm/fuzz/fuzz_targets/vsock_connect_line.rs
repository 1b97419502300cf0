//! The host's `CONNECT <port>\n` line: any bytes give a port or an error, never a panic.
#![no_main]

use brig_vmm::devices::virtio::vsock::parse_connect_line;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(port) = parse_connect_line(data) {
        // A port is only ever parsed from a decimal line that ends in a newline.
        assert!(data.ends_with(b"\n"));
        let _ = port;
    }
});

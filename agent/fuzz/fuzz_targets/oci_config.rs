//! A container's OCI config and an exec's process, as the agent reads them for
//! CreateContainer and ExecProcess: the input is the config's JSON, then a NUL byte, then
//! the process's JSON. Any bytes must give a clear error or success, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (spec, process) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &b""[..]),
    };
    let (Ok(spec), Ok(process)) = (std::str::from_utf8(spec), std::str::from_utf8(process)) else {
        return;
    };
    let _ = brig_agent::check_oci_config(spec, process);
});

//! What the host makes of the agent's replies, as a hostile guest may send them: the ttrpc
//! payload decoded as each reply the runtime reads, then turned into the runtime's own
//! values (exit statuses, statistics) and into text for users (escaped). Never a panic, and
//! no control character reaches a terminal.
#![no_main]

use brig_protocols::agent::{
    ListProcessesResponse, StatsResponse, VersionResponse, WaitProcessResponse,
};
use brig_runtime::container::ExitStatus;
use brig_runtime::guest_text;
use brig_runtime::resources::Stats;
use libfuzzer_sys::fuzz_target;
use protobuf::Message;

fn shown(text: &str) {
    let line = guest_text::line(text);
    assert!(!line.chars().any(char::is_control), "{line:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let Ok(r) = WaitProcessResponse::parse_from_bytes(bytes) {
                let _ = ExitStatus::from(r);
            }
        }
        1 => {
            if let Ok(r) = StatsResponse::parse_from_bytes(bytes) {
                let stats = Stats::from(r);
                let _ = stats.memory.working_set_bytes();
            }
        }
        2 => {
            if let Ok(v) = VersionResponse::parse_from_bytes(bytes) {
                shown(&v.agent_version);
                shown(&v.kernel_release);
            }
        }
        _ => {
            if let Ok(list) = ListProcessesResponse::parse_from_bytes(bytes) {
                for p in &list.processes {
                    shown(&p.cmdline);
                }
            }
        }
    }
});

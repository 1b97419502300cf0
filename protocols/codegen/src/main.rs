//! Regenerates the checked-in Rust code of `brig-protocols` from `protocols/agent.proto`.
//!
//! Run from anywhere in the workspace: `cargo run -p brig-protocols-codegen`. It writes
//! `protocols/src/generated/{agent.rs, agent_ttrpc.rs, agent_ttrpc_async.rs}`; commit the result.
//! Pure Rust (`ttrpc-codegen`): no `protoc` needed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

/// The `.proto` files of the agent API, relative to `protocols/`. Each `NAME.proto` becomes
/// `NAME.rs` (messages), `NAME_ttrpc.rs` (sync) and `NAME_ttrpc_async.rs` (async).
const PROTOS: &[&str] = &["agent"];

fn main() -> ExitCode {
    match run() {
        Ok(out_dir) => {
            println!("{}", out_dir.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("brig-protocols-codegen: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> io::Result<PathBuf> {
    let protocols_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| io::Error::other("codegen crate has no parent directory"))?
        .to_path_buf();
    let out_dir = protocols_dir.join("src").join("generated");
    let scratch =
        std::env::temp_dir().join(format!("brig-protocols-codegen.{}", std::process::id()));
    let sync_dir = scratch.join("sync");
    let async_dir = scratch.join("async");
    fs::create_dir_all(&sync_dir)?;
    fs::create_dir_all(&async_dir)?;
    fs::create_dir_all(&out_dir)?;

    let inputs: Vec<PathBuf> = PROTOS
        .iter()
        .map(|name| protocols_dir.join(format!("{name}.proto")))
        .collect();

    // Pass 1: messages + sync client/server.
    Codegen::new()
        .out_dir(&sync_dir)
        .inputs(&inputs)
        .include(&protocols_dir)
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize::default())
        .run()?;
    // Pass 2: async client/server only (messages are shared with pass 1).
    Codegen::new()
        .out_dir(&async_dir)
        .inputs(&inputs)
        .include(&protocols_dir)
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .run()?;

    for name in PROTOS {
        copy(
            &sync_dir.join(format!("{name}.rs")),
            &out_dir.join(format!("{name}.rs")),
        )?;
        copy(
            &sync_dir.join(format!("{name}_ttrpc.rs")),
            &out_dir.join(format!("{name}_ttrpc.rs")),
        )?;
        copy(
            &async_dir.join(format!("{name}_ttrpc.rs")),
            &out_dir.join(format!("{name}_ttrpc_async.rs")),
        )?;
    }
    fs::remove_dir_all(&scratch)?;
    Ok(out_dir)
}

fn copy(from: &Path, to: &Path) -> io::Result<()> {
    fs::copy(from, to).map(|_| ()).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("copy {} -> {}: {err}", from.display(), to.display()),
        )
    })
}

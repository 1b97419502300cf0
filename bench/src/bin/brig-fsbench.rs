//! `brig-fsbench DIR WRITE_MIB FILES`: the file-system workload of `brig-bench fs`, run the
//! same way on the host itself and inside guests (a static binary, std only).
//!
//! In DIR the host has made `read.bin` and `files/` (FILES files). In order:
//! 1. `read`: sequential read of `read.bin` in 1 MiB `read()`s (MB/s, MB = 10^6 bytes);
//! 2. `write`: a new `write.bin` of WRITE_MIB × 1 MiB `write()`s, then `fsync` and close (MB/s);
//! 3. `stat`: readdir of `files/` and `lstat` of every entry (seconds);
//! 4. `create`: `created/` with FILES new files of a few bytes each, each closed (seconds);
//! 5. `unlink`: unlink them and remove `created/` (seconds).
//!
//! Results go to stdout and to `DIR/results` as `key value` lines, ending with `done 1`; a
//! failure is written there as `error MESSAGE` (a guest container may have no stdout).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

const CHUNK: usize = 1 << 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, write_mib, files] = args.as_slice() else {
        eprintln!("usage: brig-fsbench DIR WRITE_MIB FILES");
        std::process::exit(2);
    };
    let dir = PathBuf::from(dir);
    let mut out = String::new();
    let result = match (write_mib.parse(), files.parse()) {
        (Ok(mib), Ok(n)) => workload(&dir, mib, n, &mut out),
        _ => Err(format!(
            "WRITE_MIB {write_mib:?} and FILES {files:?} must be numbers"
        )),
    };
    let code = match result {
        Ok(()) => {
            out.push_str("done 1\n");
            0
        }
        Err(e) => {
            let _ = writeln!(out, "error {e}");
            1
        }
    };
    print!("{out}");
    let tmp = dir.join("results.tmp");
    if let Err(e) =
        std::fs::write(&tmp, &out).and_then(|()| std::fs::rename(&tmp, dir.join("results")))
    {
        eprintln!("brig-fsbench: writing {}/results: {e}", dir.display());
        std::process::exit(1);
    }
    std::process::exit(code);
}

fn workload(dir: &Path, write_mib: usize, files: usize, out: &mut String) -> Result<(), String> {
    let ctx = |what: &str, path: &Path| {
        let msg = format!("{what} {}", path.display());
        move |e: std::io::Error| format!("{msg}: {e}")
    };
    let mut buf = vec![0x5a_u8; CHUNK];

    let path = dir.join("read.bin");
    let started = Instant::now();
    let mut file = File::open(&path).map_err(ctx("open", &path))?;
    let mut bytes = 0u64;
    loop {
        match file.read(&mut buf).map_err(ctx("read", &path))? {
            0 => break,
            n => bytes += n as u64,
        }
    }
    drop(file);
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(
        out,
        "read_bytes {bytes}\nread_secs {secs:.4}\nread_mbps {:.1}",
        bytes as f64 / secs / 1e6
    );

    let path = dir.join("write.bin");
    let started = Instant::now();
    let mut file = File::create(&path).map_err(ctx("create", &path))?;
    for _ in 0..write_mib {
        file.write_all(&buf).map_err(ctx("write", &path))?;
    }
    file.sync_all().map_err(ctx("fsync", &path))?;
    drop(file);
    let secs = started.elapsed().as_secs_f64();
    let bytes = (write_mib * CHUNK) as f64;
    let _ = writeln!(
        out,
        "write_bytes {bytes}\nwrite_secs {secs:.4}\nwrite_mbps {:.1}",
        bytes / secs / 1e6
    );

    let path = dir.join("files");
    let started = Instant::now();
    let mut seen = 0usize;
    for entry in std::fs::read_dir(&path).map_err(ctx("list", &path))? {
        let entry = entry.map_err(ctx("list", &path))?;
        std::fs::symlink_metadata(entry.path()).map_err(ctx("stat", &entry.path()))?;
        seen += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    if seen != files {
        return Err(format!(
            "{} holds {seen} entries, expected {files}",
            path.display()
        ));
    }
    let _ = writeln!(out, "stat_files {seen}\nstat_secs {secs:.4}");

    let created = dir.join("created");
    let names: Vec<PathBuf> = (0..files)
        .map(|i| created.join(format!("f{i:05}")))
        .collect();
    let started = Instant::now();
    std::fs::create_dir(&created).map_err(ctx("mkdir", &created))?;
    for name in &names {
        let mut file = File::create(name).map_err(ctx("create", name))?;
        file.write_all(b"brig-fsbench\n")
            .map_err(ctx("write", name))?;
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(out, "create_files {files}\ncreate_secs {secs:.4}");

    let started = Instant::now();
    for name in &names {
        std::fs::remove_file(name).map_err(ctx("unlink", name))?;
    }
    std::fs::remove_dir(&created).map_err(ctx("rmdir", &created))?;
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(out, "unlink_files {files}\nunlink_secs {secs:.4}");
    Ok(())
}

//! The images benchmark (`make bench-images`, report in bench/reports/images.md): pulling and
//! unpacking a multi-layer image from a registry on loopback with `brig pull`, against
//! `skopeo copy` + `umoci unpack` of the same image, in one session. Not a test: it is
//! `#[ignore]`d so that `make test` only builds it, and it asserts nothing about speed.
//!
//! Lines of the report are printed with the prefix `report: `.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use brig_e2e::registry::{self, Registry};
use brig_e2e::{busybox_rootfs, env_path, min_median_max_ms, scratch, text};

const RUNS: usize = 5;

fn report(line: &str) {
    println!("report: {line}");
}

fn ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

/// A tree of `files` small text files and one incompressible file of `mib` MiB.
fn data_tree(dir: &Path, files: usize, mib: usize, seed: u64) {
    std::fs::create_dir_all(dir.join("srv/small")).unwrap();
    for i in 0..files {
        std::fs::write(
            dir.join(format!("srv/small/{i:05}.txt")),
            format!("file {i} of layer {seed}\n").repeat(20),
        )
        .unwrap();
    }
    let mut x = seed | 1;
    let mut big = Vec::with_capacity(mib << 20);
    while big.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        big.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(dir.join(format!("srv/blob-{seed}.bin")), big).unwrap();
}

#[test]
#[ignore]
fn bench_images() {
    // libtest prints "test NAME ... " without a newline: the first report line needs its own.
    println!();
    let work = scratch("bench-images");
    let reg = Registry::start(&work.join("reg"));
    let busybox = busybox_rootfs(&work.join("busybox"));
    let (a, b) = (work.join("tree-a"), work.join("tree-b"));
    data_tree(&a, 2000, 24, 1);
    data_tree(&b, 1000, 8, 2);
    let layout = work.join("layout");
    registry::oci_layout(
        &layout,
        &serde_json::json!({
            "tag": "latest",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "layers": [
                {"compression": "gzip", "dir": busybox},
                {"compression": "gzip", "dir": a},
                {"compression": "gzip", "dir": b},
            ],
        }),
    );
    let image = format!("{}/bench/data:1", reg.addr);
    registry::push(&layout, "latest", &image);
    let blobs: u64 = std::fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();

    let (mut brig, mut peer) = (Vec::new(), Vec::new());
    for round in 0..RUNS {
        let store = work.join(format!("store-{round}"));
        let brig_time = timed(|| {
            ok(
                Command::new(env_path("BRIG_BIN"))
                    .env("BRIG_IMAGE_ROOT", &store)
                    .args(["pull", "-q", "--tls-verify=false", &image]),
                "brig pull",
            )
        });
        let oci = work.join(format!("skopeo-{round}"));
        let bundle = work.join(format!("bundle-{round}"));
        let peer_time = timed(|| {
            ok(
                registry::skopeo().args([
                    "copy",
                    "--src-tls-verify=false",
                    "--src-no-creds",
                    &format!("docker://{image}"),
                    &format!("oci:{}:latest", oci.display()),
                ]),
                "skopeo copy",
            );
            ok(
                Command::new("umoci").args([
                    "unpack",
                    "--image",
                    &format!("{}:latest", oci.display()),
                    &bundle.display().to_string(),
                ]),
                "umoci unpack",
            );
        });
        brig.push(brig_time);
        peer.push(peer_time);
        let _ = std::fs::remove_dir_all(&store);
        let _ = std::fs::remove_dir_all(&oci);
        let _ = std::fs::remove_dir_all(&bundle);
    }
    let (b_min, b_med, b_max) = min_median_max_ms(&mut brig);
    let (p_min, p_med, p_max) = min_median_max_ms(&mut peer);
    report("# Images: pull and unpack");
    report("");
    report(&format!(
        "A 3-layer image ({:.1} MiB of gzip blobs: busybox; 2000 small files and 24 MiB of random data; 1000 files and 8 MiB) from Debian's docker-registry on loopback, into an empty store each time; {RUNS} runs each, alternating, in one session (`make bench-images`).",
        blobs as f64 / (1 << 20) as f64
    ));
    report("");
    report("| | min ms | median ms | max ms |");
    report("|---|---|---|---|");
    report(&format!(
        "| `brig pull` | {b_min:.0} | {b_med:.0} | {b_max:.0} |"
    ));
    report(&format!(
        "| `skopeo copy` + `umoci unpack` | {p_min:.0} | {p_med:.0} | {p_max:.0} |"
    ));
    report("");
    report(&format!(
        "Ratio of medians, Brig / skopeo+umoci: **{:.2}** (goal ≤ 1).",
        b_med / p_med
    ));
    let _ = std::fs::remove_dir_all(&work);
}

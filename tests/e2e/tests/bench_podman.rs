//! The podman benchmark (`make bench-podman`, report in bench/reports/podman.md): `podman run
//! --rm IMAGE true` with Brig as the runtime against podman with runc, in one session, and
//! `brig boot` in the same session to split Brig's time into the microVM's boot and the
//! rest. Not a test: it is `#[ignore]`d so that `make test` only builds it, and it asserts
//! nothing about speed.
//!
//! Lines of the report are printed with the prefix `report: `.

use std::time::Instant;

use brig_e2e::podman::{Podman, IMAGE};
use brig_e2e::{brig, min_median_max_ms, stdout_of};

const RUNS: usize = 10;

fn report(line: &str) {
    println!("report: {line}");
}

#[test]
#[ignore]
fn bench_podman() {
    // libtest prints "test NAME ... " without a newline: the first report line needs its own.
    println!();
    let with_brig = Podman::new("bench-podman");
    with_brig.import_busybox();
    let with_runc = Podman {
        runtime: "/usr/bin/runc".into(),
        storage: with_brig.storage.clone(),
        brig_root: with_brig.brig_root.clone(),
    };
    let run = ["run", "--rm", "--network", "none", IMAGE, "true"];
    let timed = |podman: &Podman| {
        let t = Instant::now();
        podman.ok(&run);
        t.elapsed()
    };
    // The first run of each loads binaries and podman's state: not counted.
    timed(&with_brig);
    timed(&with_runc);
    let (mut brig_runs, mut runc_runs, mut boots) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        brig_runs.push(timed(&with_brig));
        runc_runs.push(timed(&with_runc));
        let t = Instant::now();
        stdout_of(
            brig("bench-podman").arg("boot").output().unwrap(),
            "brig boot",
        );
        boots.push(t.elapsed());
    }
    let (b_min, b_med, b_max) = min_median_max_ms(&mut brig_runs);
    let (r_min, r_med, r_max) = min_median_max_ms(&mut runc_runs);
    let (v_min, v_med, v_max) = min_median_max_ms(&mut boots);
    report("# podman run: Brig against runc");
    report("");
    report(&format!(
        "`podman run --rm --network none {IMAGE} true` (Debian's podman 4.3, conmon, vfs storage), {RUNS} runs each after one warm-up, alternating, in one session (`make bench-podman`); the microVM's boot is `brig boot` (boot, agent answers, power off) measured in the same loop."
    ));
    report("");
    report("| | min ms | median ms | max ms |");
    report("|---|---|---|---|");
    report(&format!(
        "| podman + Brig | {b_min:.0} | {b_med:.0} | {b_max:.0} |"
    ));
    report(&format!(
        "| podman + runc | {r_min:.0} | {r_med:.0} | {r_max:.0} |"
    ));
    report(&format!(
        "| `brig boot` (the microVM) | {v_min:.0} | {v_med:.0} | {v_max:.0} |"
    ));
    report("");
    let rest = b_med - v_med;
    report(&format!(
        "Brig's rest (median podman + Brig − median boot): {rest:.0} ms, **{:.2}×** podman + runc's whole run (goal ≤ 1). Whole run: {:.2}× runc's.",
        rest / r_med,
        b_med / r_med
    ));
}

//! A microVM boots, the agent answers over vsock, and the VMM ends cleanly.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use brig_e2e::{config, dir_entries, processes_named, scratch, vmm_command};
use brig_runtime::{Sandbox, SandboxSpec};
use sha2::{Digest, Sha256};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn one_vcpu_guest_answers_with_its_version_and_powers_off_cleanly() {
    let cfg = config("one-vcpu");
    rt().block_on(async {
        let mut spec = SandboxSpec::new("one", &cfg);
        spec.cpus = 1;
        let sandbox = Sandbox::start(&cfg, &spec).await.expect("boot");
        let v = sandbox.agent().version().await.expect("Version over vsock");
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(v.api_version, brig_protocols::AGENT_API_VERSION);
        assert!(
            v.kernel_release.starts_with("6.1"),
            "guest kernel {}",
            v.kernel_release
        );
        assert_eq!(v.cpus_online, 1);
        let mem_mib = v.mem_total_kib / 1024;
        assert!(
            (200..=256).contains(&mem_mib),
            "guest sees {mem_mib} MiB of 256"
        );
        let pid = sandbox.vmm_pid().unwrap();
        let status = sandbox.shutdown().await.expect("shutdown");
        assert!(status.success(), "brig-vmm exit after Shutdown: {status}");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "brig-vmm {pid} still there"
        );
    });
    assert_eq!(
        dir_entries(&cfg.root.join("sandboxes")),
        Vec::<String>::new(),
        "state left behind"
    );
}

#[test]
fn two_vcpu_guest_sees_two_cpus() {
    let cfg = config("two-vcpus");
    rt().block_on(async {
        let mut spec = SandboxSpec::new("two", &cfg);
        spec.cpus = 2;
        let sandbox = Sandbox::start(&cfg, &spec).await.expect("boot");
        let v = sandbox.agent().version().await.unwrap();
        assert_eq!(v.cpus_online, 2, "guest sees {} CPUs", v.cpus_online);
        assert!(sandbox.shutdown().await.unwrap().success());
    });
}

#[test]
fn guest_connection_reaches_host_listener_and_carries_a_mebibyte_each_way() {
    const SIZE: usize = 1 << 20;
    const PORT: u32 = 5000;
    let cfg = config("vsock-bulk");
    rt().block_on(async {
        let sandbox = Sandbox::start(&cfg, &SandboxSpec::new("bulk", &cfg))
            .await
            .expect("boot");
        let listener = UnixListener::bind(sandbox.vsock_listener_path(PORT)).unwrap();
        // Host side: accept the guest's connection, send 1 MiB of our own bytes, read the
        // guest's 1 MiB until EOF. Runs on a thread: the agent call below waits for it.
        let host_data: Vec<u8> = (0..SIZE)
            .map(|i| (i.wrapping_mul(7919) >> 3) as u8 ^ (i as u8))
            .collect();
        let sent = host_data.clone();
        let host = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("guest connection");
            stream
                .set_read_timeout(Some(Duration::from_secs(120)))
                .unwrap();
            let mut reader = stream.try_clone().unwrap();
            let reading = std::thread::spawn(move || {
                let mut got = Vec::new();
                reader.read_to_end(&mut got).map(|_| got)
            });
            stream.write_all(&sent).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            reading.join().unwrap().expect("read guest data")
        });
        let report = sandbox
            .agent()
            .vsock_self_test(PORT, SIZE as u64)
            .await
            .expect("VsockSelfTest");
        let from_guest = host.join().unwrap();
        // Host → guest: the guest saw exactly our bytes.
        assert_eq!(report.received_bytes, SIZE as u64);
        assert_eq!(report.received_sha256, Sha256::digest(&host_data).to_vec());
        // Guest → host: we saw exactly the guest's bytes.
        assert_eq!(from_guest.len(), SIZE);
        assert_eq!(report.sent_sha256, Sha256::digest(&from_guest).to_vec());
        assert!(sandbox.shutdown().await.unwrap().success());
    });
}

#[test]
fn guest_connection_to_a_port_nobody_listens_on_is_refused() {
    let cfg = config("vsock-refused");
    rt().block_on(async {
        let sandbox = Sandbox::start(&cfg, &SandboxSpec::new("refused", &cfg))
            .await
            .expect("boot");
        let started = Instant::now();
        let err = sandbox
            .agent()
            .vsock_self_test(5001, 16)
            .await
            .expect_err("no listener on 5001");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refusal took {:?}",
            started.elapsed()
        );
        let msg = err.to_string().to_lowercase();
        assert!(msg.contains("refused") || msg.contains("reset"), "{msg}");
        // The agent is still fine afterwards.
        assert_eq!(
            sandbox.agent().version().await.unwrap().api_version,
            brig_protocols::AGENT_API_VERSION
        );
        assert!(sandbox.shutdown().await.unwrap().success());
    });
}

#[test]
fn guest_kernel_panic_makes_vmm_fail_with_the_panic_in_the_console() {
    let dir = scratch("panic");
    let console = dir.join("console.log");
    let out = vmm_command()
        .args([
            "--cmdline",
            "console=ttyS0 reboot=k panic=-1 rdinit=/nonexistent init=/nonexistent",
        ])
        .arg("--console")
        .arg(&console)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "brig-vmm status {:?}, stderr: {stderr}",
        out.status
    );
    assert!(stderr.contains("guest kernel panicked"), "stderr: {stderr}");
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(log.contains("Kernel panic - not syncing"), "console: {log}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_configuration_gets_one_clear_line_and_status_2() {
    let dir = scratch("badflags");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"").unwrap();
    let initrd = brig_e2e::env_path("BRIG_INITRD");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--cpus".into(), "0".into()],
            "--cpus 0 is out of range",
        ),
        (
            vec!["--cpus".into(), "99".into()],
            "--cpus 99 is out of range",
        ),
        (
            vec!["--memory".into(), "16M".into()],
            "--memory 16 MiB is out of range",
        ),
        (vec!["--memory".into(), "lots".into()], "not a memory size"),
        (
            vec!["--vsock-uds".into(), taken.display().to_string()],
            "already exists",
        ),
        // Confined, the VMM sees only the socket's directory: the share must be inside it.
        (
            vec![
                "--vsock-uds".into(),
                dir.join("sub/v.sock").display().to_string(),
                "--fs".into(),
                format!("t={}", dir.display()),
            ],
            "is not inside",
        ),
        (vec!["--no-such-flag".into()], "--no-such-flag"),
    ];
    for (args, expect) in cases {
        let out = vmm_command()
            .args(&args)
            .args(["--console", "off"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: status {:?} stderr {stderr}",
            out.status
        );
        assert!(
            stderr.contains(expect),
            "{args:?}: stderr {stderr:?} lacks {expect:?}"
        );
    }
    // Not an ELF vmlinux: the initramfs passed as the kernel.
    let out = std::process::Command::new(brig_e2e::env_path("BRIG_VMM"))
        .arg("--kernel")
        .arg(&initrd)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr {stderr}");
    assert!(
        stderr.contains("not a loadable x86_64 ELF vmlinux"),
        "{stderr}"
    );
    // Missing kernel.
    let out = std::process::Command::new(brig_e2e::env_path("BRIG_VMM"))
        .args(["--kernel", "/nonexistent/vmlinux"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vmlinux does not exist"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ten_boots_in_a_row_leave_nothing_behind() {
    let cfg = config("ten-boots");
    let tmp_before = dir_entries(&std::env::temp_dir());
    rt().block_on(async {
        for i in 0..10 {
            let sandbox = Sandbox::start(&cfg, &SandboxSpec::new(format!("b{i}"), &cfg))
                .await
                .expect("boot");
            assert_eq!(
                sandbox.agent().version().await.unwrap().api_version,
                brig_protocols::AGENT_API_VERSION
            );
            if i % 2 == 0 {
                assert!(sandbox.shutdown().await.unwrap().success());
            } else {
                sandbox.kill().await.unwrap(); // the unclean way must clean up too
            }
        }
    });
    assert_eq!(
        processes_named("brig-vmm"),
        Vec::<u32>::new(),
        "brig-vmm processes left"
    );
    assert_eq!(
        dir_entries(&cfg.root.join("sandboxes")),
        Vec::<String>::new(),
        "sandbox state left in {}",
        cfg.root.display()
    );
    let tmp_after = dir_entries(&std::env::temp_dir());
    let new: Vec<_> = tmp_after
        .iter()
        .filter(|e| !tmp_before.contains(e))
        .collect();
    assert!(new.is_empty(), "new temp files: {new:?}");
}

#[test]
fn brig_boot_prints_the_agent_version_and_boot_time() {
    let out = std::process::Command::new(brig_e2e::env_path("BRIG_BIN"))
        .args(["boot", "--root", "/run/brig-e2e/cli-boot"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "brig boot: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "agent {} (API {}) answering over vsock",
            env!("CARGO_PKG_VERSION"),
            brig_protocols::AGENT_API_VERSION
        )),
        "{stdout}"
    );
    assert!(stdout.contains("boot time: "), "{stdout}");
    assert!(stdout.contains("powered off cleanly"), "{stdout}");
}

#[test]
fn brig_check_reports_kvm_and_agrees_with_the_host() {
    let out = std::process::Command::new(brig_e2e::env_path("BRIG_BIN"))
        .arg("check")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let hardware = std::path::Path::new("/sys/module/kvm_amd").exists()
        || std::path::Path::new("/sys/module/kvm_intel").exists();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert!(stdout.lines().any(|l| l.starts_with("kvm ")), "{stdout}");
    // We are booting guests in this very test run, so this host can.
    assert!(
        hardware && !pvm,
        "the e2e tests run where hardware KVM is available"
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}");
}

/// A field of /proc/PID/task/TID/status.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn the_vmm_runs_confined_filtered_in_its_own_pid_namespace_and_without_root_capabilities() {
    let cfg = config("confined");
    rt().block_on(async {
        for (share, want_eff) in [(false, 0u64), (true, 0x0800_00db)] {
            let mut spec = SandboxSpec::new("confined", &cfg);
            spec.share = share;
            let sandbox = Sandbox::start(&cfg, &spec).await.expect("boot");
            // The runtime's VMM is a supervisor outside the VM's PID namespace: no
            // capabilities, filtered, and the parent of the one process that runs the VM.
            let supervisor = sandbox.vmm_pid().unwrap();
            let outside = std::fs::read_to_string(format!("/proc/{supervisor}/status")).unwrap();
            assert_eq!(status_field(&outside, "CapEff:"), "0000000000000000");
            assert_eq!(
                status_field(&outside, "Seccomp:"),
                "2",
                "supervisor unfiltered"
            );
            assert_eq!(status_field(&outside, "NoNewPrivs:"), "1");
            assert_eq!(status_field(&outside, "Threads:"), "1");
            let children =
                std::fs::read_to_string(format!("/proc/{supervisor}/task/{supervisor}/children"))
                    .unwrap();
            let children: Vec<u32> = children
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
            assert_eq!(children.len(), 1, "supervisor's children: {children:?}");
            let pid = children[0];
            let main = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            // PID 1 of a namespace of its own: it can name no process of the host.
            assert_eq!(
                status_field(&main, "NSpid:")
                    .split_whitespace()
                    .collect::<Vec<_>>(),
                [pid.to_string().as_str(), "1"],
                "the VM's process is not PID 1 of its own namespace"
            );
            // chown, dac_override, fowner, fsetid, setgid, setuid and mknod with a share.
            let eff = u64::from_str_radix(&status_field(&main, "CapEff:"), 16).unwrap();
            assert_eq!(eff, want_eff, "share {share}: CapEff {eff:#x}");
            let bnd = u64::from_str_radix(&status_field(&main, "CapBnd:"), 16).unwrap();
            assert_eq!(
                bnd & (1 << 21),
                0,
                "CAP_SYS_ADMIN still in the bounding set: {bnd:#x}"
            );
            let mut threads = 0;
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .flatten()
            {
                let status = std::fs::read_to_string(task.path().join("status")).unwrap();
                let name = status_field(&status, "Name:");
                assert_eq!(
                    status_field(&status, "Seccomp:"),
                    "2",
                    "thread {name} is not filtered"
                );
                // No execve can give it privileges back (set with each thread's filter).
                assert_eq!(
                    status_field(&status, "NoNewPrivs:"),
                    "1",
                    "thread {name} can gain privileges"
                );
                threads += 1;
            }
            assert!(threads >= 4, "{threads} threads");
            // Its root is the sandbox directory: its socket is at /, the host's /etc is not there.
            let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
            assert!(
                root.join("vsock.sock").exists(),
                "no vsock.sock at the VMM's root"
            );
            assert!(
                !root.join("etc/passwd").exists(),
                "the VMM sees the host's /etc"
            );
            assert_eq!(
                root.join("shared").is_dir(),
                share,
                "share {share}: /shared at the VMM's root"
            );
            assert!(sandbox.shutdown().await.unwrap().success());
        }
    });
}

//! `brig run`'s networks: `bridge` (the default, made by the CNI bridge, host-local and
//! portmap plugins, as docker's bridge), `none`, and `netns:PATH` (a namespace someone else
//! made). What a container publishes is reachable from the host, the container reaches
//! the host, and nothing is left once it is removed.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use brig_e2e::net::{host_server, http_get, VethNetns};
use brig_e2e::{brig, busybox_rootfs, dir_entries, stdout_of, text};

fn rootfs() -> &'static std::path::Path {
    static ROOTFS: OnceLock<std::path::PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("brig-e2e-net-rootfs-{}", std::process::id()));
        busybox_rootfs(&dir)
    })
}

fn iptables_rules() -> String {
    let out = Command::new("iptables-save").output().unwrap();
    text(&out.stdout)
}

#[test]
fn the_default_bridge_publishes_a_port_and_reaches_the_host_and_leaves_nothing() {
    let test = "net-bridge";
    let name = "web1";
    // The default network, as a user meets it (run-all.sh sets none for other tests).
    let out = brig(test)
        .env_remove("BRIG_NETWORK")
        .args(["run", "-d", "--name", name, "-p", "18081:80", "--dns", "10.96.0.10"])
        .arg(rootfs())
        .args([
            "sh",
            "-c",
            "mkdir -p /www && echo hello-from-brig > /www/index.html && exec httpd -f -p 80 -h /www",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    stdout_of(out, "brig run -d -p 18081:80");
    let exec = |script: &str| {
        stdout_of(
            brig(test)
                .args(["exec", name, "sh", "-c", script])
                .stdin(Stdio::null())
                .output()
                .unwrap(),
            script,
        )
    };
    let addr = exec("ip -o -4 addr show eth0");
    let ip = addr
        .split_whitespace()
        .find_map(|w| w.strip_suffix("/24"))
        .unwrap_or_else(|| panic!("no /24 address on eth0: {addr}"))
        .to_string();
    assert!(ip.starts_with("10.89.0."), "{addr}");
    // The published port, on the host's address on the bridge, and the container's own.
    assert_eq!(
        http_get("10.89.0.1:18081", Duration::from_secs(60)),
        "hello-from-brig"
    );
    assert_eq!(
        http_get(&format!("{ip}:80"), Duration::from_secs(30)),
        "hello-from-brig"
    );
    // The container reaches the host; --dns is its resolver.
    let port = host_server("10.89.0.1", "hello-from-host");
    assert_eq!(
        exec(&format!("wget -q -O- http://10.89.0.1:{port}/")).trim(),
        "hello-from-host"
    );
    let resolv = exec("cat /etc/resolv.conf");
    assert!(resolv.starts_with("nameserver 10.96.0.10\n"), "{resolv}");
    let id_rules = iptables_rules();
    assert!(id_rules.contains("18081"), "no portmap rule: {id_rules}");

    stdout_of(
        brig(test).args(["rm", "-f", name]).output().unwrap(),
        "brig rm -f",
    );
    // Nothing left: veth, namespace, IP allocation, NAT and port rules.
    let links = text(
        &Command::new("ip")
            .args(["-o", "link", "show", "master", "brig0"])
            .output()
            .unwrap()
            .stdout,
    );
    assert!(links.trim().is_empty(), "veths left on brig0: {links}");
    let netns = dir_entries(std::path::Path::new("/run/brig-e2e/net-bridge/netns"));
    assert!(netns.is_empty(), "namespaces left: {netns:?}");
    let ips: Vec<String> = dir_entries(std::path::Path::new("/var/lib/cni/networks/brig"))
        .into_iter()
        .filter(|e| e.starts_with("10."))
        .collect();
    assert!(ips.is_empty(), "IP allocations left: {ips:?}");
    let rules = iptables_rules();
    assert!(!rules.contains("18081"), "port rules left: {rules}");
    assert!(
        !rules.contains(&format!("{ip}/32")) && !rules.contains(&format!("{ip} ")),
        "NAT rules left for {ip}: {rules}"
    );
}

#[test]
fn publish_all_puts_each_port_an_image_exposes_on_a_free_host_port() {
    let test = "net-publish-all";
    let name = "webp";
    let dir = brig_e2e::scratch(test);
    // An image that exposes 80/tcp and 53/udp and serves a page on 80.
    let image = dir.join("image");
    brig_e2e::registry::oci_layout(
        &image,
        &serde_json::json!({
            "tag": "latest",
            "config": {
                "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}},
                "Cmd": ["sh", "-c", "mkdir -p /www && echo hello-from-an-image > /www/index.html && exec httpd -f -p 80 -h /www"],
            },
            "layers": [{"dir": rootfs()}],
        }),
    );
    let brig = |args: &[&str]| {
        brig(test)
            .env("BRIG_IMAGE_ROOT", dir.join("store"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let source = format!("oci:{}", image.display());
    let out = brig(&[
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "bridge",
        "-P",
        &source,
    ]);
    stdout_of(out, "brig run -d -P");
    // Both exposed ports, each on a host port of its own, as `docker port` lists them.
    let ports = stdout_of(brig(&["port", name]), "brig port");
    let mut lines: Vec<&str> = ports.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 2, "{ports}");
    let host_port = |line: &str, prefix: &str| -> u16 {
        line.strip_prefix(prefix)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{line:?} is not {prefix}PORT"))
    };
    let web = host_port(lines[1], "80/tcp -> 0.0.0.0:");
    let dns = host_port(lines[0], "53/udp -> 0.0.0.0:");
    assert!(web != 0 && dns != 0);
    assert_eq!(
        http_get(&format!("10.89.0.1:{web}"), Duration::from_secs(60)),
        "hello-from-an-image"
    );
    let rules = iptables_rules();
    assert!(
        rules.contains(&format!("--dport {web}")),
        "no rule for {web}: {rules}"
    );
    stdout_of(brig(&["rm", "-f", name]), "brig rm -f");
    let rules = iptables_rules();
    assert!(
        !rules.contains(&format!("--dport {web}")),
        "rule left: {rules}"
    );
    // Without the bridge there is nothing to publish on.
    let out = brig(&["run", "--rm", "--network", "none", "-P", &source]);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("-p and -P publish ports of the bridge network"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn network_none_has_loopback_only_and_it_is_up() {
    let out = brig("net-none")
        .args(["run", "--rm", "--network", "none", "--name", "alone"])
        .arg(rootfs())
        .args([
            "sh",
            "-c",
            "ls /sys/class/net; ip -o link show lo; grep -v : /etc/hosts",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = stdout_of(out, "--network none");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("lo"), "{out}");
    assert!(out.contains("LOWER_UP") || out.contains(",UP"), "{out}");
    // As docker's /etc/hosts: without an address of its own the name is on 127.0.1.1.
    assert!(
        out.ends_with("127.0.0.1\tlocalhost\n127.0.1.1\talone\n"),
        "{out}"
    );
}

#[test]
fn network_netns_joins_a_namespace_someone_else_made() {
    let ns = VethNetns::new(&format!("brig-e2e-{}", std::process::id()), "10.99.7");
    let port = host_server("10.99.7.1", "hello-netns");
    let out = brig("net-netns")
        .args(["run", "--rm", "--network", &ns.network_arg(), "--name", "joined"])
        .arg(rootfs())
        .args([
            "sh",
            "-c",
            &format!(
                "ip -o -4 addr show eth0; grep joined /etc/hosts; wget -q -O- http://10.99.7.1:{port}/"
            ),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    drop(ns);
    let out = stdout_of(out, "--network netns:");
    assert!(out.contains("10.99.7.2/24"), "{out}");
    // /etc/hosts names the container on the address it was given.
    assert!(out.contains("\n10.99.7.2\tjoined\n"), "{out}");
    assert!(out.trim_end().ends_with("hello-netns"), "{out}");
}

#[test]
fn a_bad_network_is_one_clear_line() {
    for (flags, words) in [
        (vec!["--network", "bogus"], "use bridge, none, or netns:"),
        (
            vec!["--network", "none", "-p", "80:80"],
            "-p and -P publish ports of the bridge network",
        ),
        (vec!["-p", "80"], "HOST_PORT:CONTAINER_PORT"),
    ] {
        let out = brig("net-bad")
            .args(["run", "--rm"])
            .args(&flags)
            .arg(rootfs())
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0), "{flags:?}");
        let err = text(&out.stderr);
        assert!(err.contains(words), "{flags:?}: {err}");
    }
}

/// Deterministic, incompressible bytes (xorshift64*), `len` of them.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x6272_6967_6e65_7430;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn bulk_data_crosses_the_nic_intact_both_ways_with_offloads_on_and_off() {
    use sha2::{Digest, Sha256};
    // 16 MiB each way by default: under the lab's emulation the guest moves a few MiB/s, and
    // each test has 450 s. BRIG_E2E_NET_MIB=1024 moves 1 GiB (on a real host, seconds).
    let mib: usize = std::env::var("BRIG_E2E_NET_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let to_guest = std::sync::Arc::new(pattern(mib << 20));
    let want_in = hex(&Sha256::digest(to_guest.as_slice()));
    // What the guest sends: `seq 1 N`, as the host's own seq writes it.
    let count = (mib << 20) / 8;
    let mut want_out = Sha256::new();
    for i in 1..=count {
        want_out.update(format!("{i}\n").as_bytes());
    }
    let want_out = hex(&want_out.finalize());
    for offload in [true, false] {
        let test = if offload {
            "net-bulk-on"
        } else {
            "net-bulk-off"
        };
        let pid = std::process::id();
        let ns = VethNetns::new(&format!("brig-bulk-{pid}-{offload}"), "10.99.9");
        let sender = TcpListener::bind("10.99.9.1:0").unwrap();
        let send_port = sender.local_addr().unwrap().port();
        let receiver = TcpListener::bind("10.99.9.1:0").unwrap();
        let recv_port = receiver.local_addr().unwrap().port();
        let data = to_guest.clone();
        let sending = std::thread::spawn(move || {
            let (mut s, _) = sender.accept().unwrap();
            let started = Instant::now();
            s.write_all(&data).unwrap();
            started.elapsed()
        });
        let receiving = std::thread::spawn(move || {
            let (mut s, _) = receiver.accept().unwrap();
            let started = Instant::now();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0usize;
            loop {
                let got = s.read(&mut buf).unwrap();
                if got == 0 {
                    break;
                }
                h.update(&buf[..got]);
                n += got;
            }
            (n, hex(&h.finalize()), started.elapsed())
        });
        let config = std::env::temp_dir().join(format!("{test}-{pid}.toml"));
        std::fs::write(&config, format!("net_offload = {offload}\n")).unwrap();
        let out = brig(test)
            .env("BRIG_CONFIG", &config)
            .args(["run", "--rm", "--memory", "256M", "--network", &ns.network_arg()])
            .arg(rootfs())
            .args([
                "sh",
                "-c",
                &format!(
                    "nc 10.99.9.1 {send_port} < /dev/null | sha256sum; seq 1 {count} | nc 10.99.9.1 {recv_port}"
                ),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        drop(ns);
        let out = stdout_of(out, &format!("bulk transfer, offload {offload}"));
        let in_time = sending.join().unwrap();
        let (n, got_out, out_time) = receiving.join().unwrap();
        assert_eq!(
            out.split_whitespace().next(),
            Some(want_in.as_str()),
            "host → guest, offload {offload}: the guest's SHA-256 of {mib} MiB differs"
        );
        assert_eq!(
            got_out, want_out,
            "guest → host, offload {offload}: {n} bytes, SHA-256 differs"
        );
        eprintln!(
            "offload {offload}: host → guest {mib} MiB in {in_time:?}, guest → host {n} bytes in {out_time:?}"
        );
    }
}

//! `brig run`'s networks: `bridge` (the default, made by the CNI bridge, host-local and
//! portmap plugins, as docker's bridge), `none`, and `netns:PATH` (a namespace someone else
//! made). What a container publishes is reachable from the host, the container reaches
//! the host, and nothing is left once it is removed.

use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

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

//! `net::attach` / `net::detach` against a real network namespace made the way CNI's bridge
//! plugin makes one (a veth with an address, a default route, a static neighbour). Needs
//! root and iproute2; skipped (with a message) without them.

use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

use brig_runtime::net::{self, IpNet, TAP_NAME};

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tc(ns: &str, args: &[&str]) -> String {
    let out = Command::new("tc")
        .arg("-n")
        .arg(ns)
        .args(args)
        .output()
        .expect("running tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Netns {
    name: String,
    peer: String,
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.peer])
            .status();
    }
}

fn usable() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    if Command::new("ip").arg("-V").output().is_err()
        || Command::new("tc").arg("-V").output().is_err()
    {
        eprintln!("skipped: needs iproute2");
        return false;
    }
    true
}

fn pod_netns() -> Netns {
    let id = std::process::id();
    let ns = Netns {
        name: format!("brig-net-{id}"),
        peer: format!("brigp{id}"),
    };
    ip(&["netns", "add", &ns.name]);
    ip(&[
        "link", "add", &ns.peer, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    ip(&["addr", "add", "10.99.0.1/24", "dev", &ns.peer]);
    ip(&["link", "set", &ns.peer, "up"]);
    let n = ns.name.as_str();
    ip(&[
        "-n",
        n,
        "link",
        "set",
        "eth0",
        "mtu",
        "1400",
        "address",
        "02:42:0a:63:00:05",
    ]);
    ip(&["-n", n, "addr", "add", "10.99.0.5/24", "dev", "eth0"]);
    ip(&["-n", n, "link", "set", "eth0", "up"]);
    ip(&["-n", n, "route", "add", "default", "via", "10.99.0.1"]);
    ip(&[
        "-n",
        n,
        "neigh",
        "add",
        "10.99.0.9",
        "lladdr",
        "02:00:00:00:00:09",
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    ns
}

#[test]
fn attach_reads_the_pod_interface_and_redirects_its_frames_to_the_tap() {
    if !usable() {
        return;
    }
    let ns = pod_netns();
    let path = std::path::PathBuf::from(format!("/run/netns/{}", ns.name));
    let attached = net::attach(&path).expect("attach").expect("an interface");
    let pod = &attached.network;
    assert_eq!(pod.interface.name, "eth0");
    assert_eq!(pod.interface.mac, [0x02, 0x42, 0x0a, 0x63, 0x00, 0x05]);
    assert_eq!(pod.interface.mtu, 1400);
    assert_eq!(
        pod.interface.addresses,
        vec![IpNet {
            address: "10.99.0.5".parse().unwrap(),
            prefix: 24
        }]
    );
    let default = pod
        .routes
        .iter()
        .find(|r| r.destination.is_none())
        .expect("a default route");
    assert_eq!(default.gateway, Some("10.99.0.1".parse().unwrap()));
    // The subnet route is the kernel's, which the guest's kernel makes too.
    assert!(
        pod.routes.iter().all(|r| r.destination.is_none()),
        "{:?}",
        pod.routes
    );
    assert_eq!(pod.neighbors.len(), 1, "{:?}", pod.neighbors);
    assert_eq!(
        pod.neighbors[0].address,
        "10.99.0.9".parse::<std::net::IpAddr>().unwrap()
    );

    // The TAP is up with the pod's MTU, and both ways are redirected.
    let tap = ip(&["-n", &ns.name, "link", "show", TAP_NAME]);
    assert!(tap.contains("mtu 1400") && tap.contains(",UP"), "{tap}");
    for dev in ["eth0", TAP_NAME] {
        let filters = tc(&ns.name, &["filter", "show", "dev", dev, "ingress"]);
        assert!(
            filters.contains("protocol all") && filters.contains("mirred"),
            "{dev}: {filters}"
        );
    }

    // A frame the host sends to the pod arrives on the TAP, behind a virtio-net header.
    let udp = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
    udp.send_to(b"hello pod", "10.99.0.5:9").unwrap();
    // Other frames (IPv6 router solicitations of the veth) may come first.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut seen = Vec::new();
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no ARP or IPv4 frame reached the TAP; saw ethertypes {seen:x?}"
        );
        let mut pfd = [nix::poll::PollFd::new(
            attached.tap.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(500u16)).unwrap() == 0 {
            continue;
        }
        let mut frame = [0u8; 2048];
        let n = nix::unistd::read(&attached.tap, &mut frame).unwrap();
        // 10-byte virtio_net_hdr (the TAP's default), then Ethernet.
        assert!(n > 10 + 14, "short frame: {n}");
        let ethertype = u16::from_be_bytes([frame[10 + 12], frame[10 + 13]]);
        if matches!(ethertype, 0x0806 | 0x0800) {
            break;
        }
        seen.push(ethertype);
    }

    // The TAP goes with its descriptor; detach removes the veth's qdisc.
    drop(attached);
    std::thread::sleep(Duration::from_millis(100));
    let links = ip(&["-n", &ns.name, "link", "show"]);
    assert!(!links.contains(TAP_NAME), "{links}");
    net::detach(&path).expect("detach");
    let qdiscs = tc(&ns.name, &["qdisc", "show", "dev", "eth0"]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    // Detaching again, or from a namespace that is gone, is fine.
    net::detach(&path).expect("detach twice");
    drop(ns);
    net::detach(&path).expect("detach after the namespace went");
}

#[test]
fn a_namespace_with_loopback_only_has_no_pod_network() {
    if !usable() {
        return;
    }
    let name = format!("brig-lo-{}", std::process::id());
    ip(&["netns", "add", &name]);
    let ns = Netns {
        name: name.clone(),
        peer: "none".into(),
    };
    let attached = net::attach(&std::path::PathBuf::from(format!("/run/netns/{name}")));
    assert!(matches!(attached, Ok(None)), "{attached:?}");
    drop(ns);
}

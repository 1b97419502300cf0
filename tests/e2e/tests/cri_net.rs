//! Pod networking through containerd's CRI with the standard CNI plugins (bridge +
//! host-local + portmap, Debian's containernetworking-plugins), as on a cluster's node: a
//! Brig pod must look to the host and to its peers exactly like a runc pod on the same
//! bridge: same kind of IP, reachable both ways, the network's MTU, the pod spec's DNS and
//! hostname, host ports; and nothing left once it is removed.

use std::time::Duration;

use brig_e2e::containerd::{CniNetwork, Containerd, IMAGE};
use brig_e2e::cri::{api, networked_container_config, networked_pod_config, Cri};
use brig_e2e::net::{host_server, http_get};

const HANDLER: &str = "sandboxed";
const RUNC: &str = "runc";

/// A container that serves `body` over HTTP on port 80 (busybox httpd).
fn web_server(body: &str) -> Vec<String> {
    vec![
        "sh".into(),
        "-c".into(),
        format!("mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 80 -h /www"),
    ]
}

/// Run a pod of one container `name` running `command` with runtime handler `handler`.
fn pod(
    cri: &Cri,
    handler: &str,
    name: &str,
    logs: &std::path::Path,
    command: Vec<String>,
    ports: Vec<api::PortMapping>,
) -> (String, String) {
    let mut config = networked_pod_config(name, logs);
    config.port_mappings = ports;
    let pod = cri.run_pod(handler, &config);
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let ctr = cri.run_container(
        &pod,
        &config,
        networked_container_config(&format!("{name}-c"), IMAGE, &args),
    );
    (pod, ctr)
}

fn in_pod(cri: &Cri, ctr: &str, script: &str) -> String {
    let (code, out, err) = cri.exec(ctr, &["sh", "-c", script]);
    assert_eq!(code, 0, "{script}: stdout {out:?} stderr {err:?}");
    out
}

#[test]
fn a_brig_pod_on_a_cni_bridge_is_a_pod_like_a_runc_one() {
    let net = CniNetwork {
        name: "brige2e1".into(),
        subnet: "10.88.71.0/24".into(),
        mtu: 1400,
        subnet6: Some("fd00:88:71::/64".into()),
    };
    let c = Containerd::start_cri_cni("cri-net", &net);
    c.import_busybox();
    let cri = Cri::connect(&c.socket);
    let logs = c.dir.join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    let host_port = api::PortMapping {
        protocol: api::Protocol::Tcp as i32,
        container_port: 80,
        host_port: 18080,
        host_ip: String::new(),
    };
    let (brig_pod, brig) = pod(
        &cri,
        HANDLER,
        "brig-a",
        &logs,
        web_server("hello-from-brig"),
        vec![host_port],
    );
    let brig_ip = cri.pod_ip(&brig_pod);
    assert!(brig_ip.starts_with("10.88.71."), "pod IP {brig_ip}");

    // The host reaches the pod on its IP, and on the host port.
    assert_eq!(
        http_get(&format!("{brig_ip}:80"), Duration::from_secs(60)),
        "hello-from-brig"
    );
    assert_eq!(
        http_get(&format!("{}:18080", net.gateway()), Duration::from_secs(30)),
        "hello-from-brig",
        "the hostPort"
    );

    // Dual stack: the IPv6 address CNI gave the pod is the guest's, and it serves on it.
    let v6 = cri
        .pod_additional_ips(&brig_pod)
        .into_iter()
        .find(|ip| ip.starts_with("fd00:88:71:"))
        .expect("an IPv6 pod address");
    let addr6 = in_pod(&cri, &brig, "ip -o -6 addr show eth0 scope global");
    assert!(addr6.contains(&format!("{v6}/64")), "{addr6}");
    assert_eq!(
        http_get(&format!("[{v6}]:80"), Duration::from_secs(60)),
        "hello-from-brig",
        "over IPv6"
    );

    // Inside, the guest is the pod: its address, the network's MTU, DNS and hostname.
    let addr = in_pod(&cri, &brig, "ip -o -4 addr show eth0");
    assert!(addr.contains(&format!("{brig_ip}/24")), "{addr}");
    assert_eq!(
        in_pod(&cri, &brig, "cat /sys/class/net/eth0/mtu").trim(),
        "1400"
    );
    let resolv = in_pod(&cri, &brig, "cat /etc/resolv.conf");
    assert!(
        resolv.contains("nameserver 10.96.0.10")
            && resolv.contains("search default.svc.cluster.local svc.cluster.local")
            && resolv.contains("ndots:5"),
        "{resolv}"
    );
    assert_eq!(in_pod(&cri, &brig, "hostname").trim(), "brig-a-host");

    // The pod reaches the host.
    let port = host_server(&net.gateway(), "hello-from-host");
    let got = in_pod(
        &cri,
        &brig,
        &format!("wget -q -O- http://{}:{port}/", net.gateway()),
    );
    assert_eq!(got.trim(), "hello-from-host");

    // A runc pod and a second Brig pod on the same bridge talk to it, and it to them.
    let (runc_pod, runc) = pod(
        &cri,
        RUNC,
        "runc-b",
        &logs,
        web_server("hello-from-runc"),
        vec![],
    );
    let runc_ip = cri.pod_ip(&runc_pod);
    let (brig2_pod, brig2) = pod(
        &cri,
        HANDLER,
        "brig-c",
        &logs,
        web_server("hello-from-brig-c"),
        vec![],
    );
    let brig2_ip = cri.pod_ip(&brig2_pod);
    let get = |ctr: &str, ip: &str| in_pod(&cri, ctr, &format!("wget -q -O- http://{ip}/"));
    assert_eq!(
        get(&runc, &brig_ip).trim(),
        "hello-from-brig",
        "runc → Brig"
    );
    assert_eq!(
        get(&brig, &runc_ip).trim(),
        "hello-from-runc",
        "Brig → runc"
    );
    assert_eq!(
        get(&brig2, &brig_ip).trim(),
        "hello-from-brig",
        "Brig → Brig"
    );
    assert_eq!(
        get(&brig, &brig2_ip).trim(),
        "hello-from-brig-c",
        "Brig → Brig"
    );

    for p in [&brig_pod, &runc_pod, &brig2_pod] {
        cri.remove_pod(p);
    }
    c.assert_clean();
    let left = net.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

//! A network of the runtime's own for sandboxes nobody else networks (`brig run --network
//! bridge`, docker's default): a network namespace per sandbox, wired by the standard CNI
//! plugins (bridge + host-local + portmap, Debian's `containernetworking-plugins`) exactly
//! as containerd's CRI wires a pod's, then handed to [`crate::net`] like any pod's.
//!
//! Every step is recorded ([`CniRecord`], kept in the sandbox's record) so that whoever ends
//! the sandbox runs CNI DEL with the same configuration and result, and removes the
//! namespace: no veth, IP allocation, iptables rule or namespace is left.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The CNI network name (host-local keeps its allocations under
/// `/var/lib/cni/networks/<name>`).
pub const NETWORK_NAME: &str = "brig";
/// The bridge on the host.
pub const BRIDGE: &str = "brig0";
/// The pod's interface name.
pub const IFNAME: &str = "eth0";
/// The CNI spec version of the configuration.
const CNI_VERSION: &str = "1.0.0";

/// A port published on the host (`-p HOST:CTR[/tcp|udp]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl std::str::FromStr for PortMapping {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("-p {s:?}: use HOST_PORT:CONTAINER_PORT[/tcp|/udp], e.g. 8080:80");
        let (ports, protocol) = match s.split_once('/') {
            Some((p, proto)) if proto == "tcp" || proto == "udp" => (p, proto),
            Some(_) => return Err(bad()),
            None => (s, "tcp"),
        };
        let (host, container) = ports.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
        Ok(Self {
            host_port: port(host)?,
            container_port: port(container)?,
            protocol: protocol.into(),
        })
    }
}

impl PortMapping {
    /// A port an image's config exposes (`80/tcp`, `53/udp`, or `8080`, which is TCP),
    /// published on a free host port (`brig run -P`, as docker does).
    pub fn exposed(port: &str) -> Result<Self, String> {
        let bad = || format!("the image exposes {port:?}, which is not PORT[/tcp|/udp]");
        let (number, protocol) = port.split_once('/').unwrap_or((port, "tcp"));
        if protocol != "tcp" && protocol != "udp" {
            return Err(bad());
        }
        let container_port = number
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(bad)?;
        let host_port = free_host_port(protocol)
            .map_err(|e| format!("finding a free host port for {port}: {e}"))?;
        Ok(Self {
            host_port,
            container_port,
            protocol: protocol.into(),
        })
    }
}

impl std::fmt::Display for PortMapping {
    /// As `docker port` shows a mapping: `80/tcp -> 0.0.0.0:32768`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} -> 0.0.0.0:{}",
            self.container_port, self.protocol, self.host_port
        )
    }
}

/// A host port of `protocol` that nothing listens on now: the kernel's pick from its
/// ephemeral range (a later listener could still take it first, as with docker's `-P`).
fn free_host_port(protocol: &str) -> std::io::Result<u16> {
    let any = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let addr = if protocol == "udp" {
        std::net::UdpSocket::bind(any)?.local_addr()?
    } else {
        std::net::TcpListener::bind(any)?.local_addr()?
    };
    Ok(addr.port())
}

/// What CNI set up for one sandbox: enough to undo it from any process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CniRecord {
    /// The sandbox's network namespace (a bind-mounted nsfs file).
    pub netns: PathBuf,
    /// The ID given to the plugins (the sandbox's).
    pub container_id: String,
    /// The network configuration list the plugins ran with.
    pub conflist: Value,
    /// Where the plugins are.
    pub plugin_dir: PathBuf,
    /// Published ports.
    pub ports: Vec<PortMapping>,
    /// The last plugin's ADD result (DEL gets it as `prevResult`).
    pub result: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("creating the network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CNI plugin {plugin} is not in {dir}: install Debian's containernetworking-plugins (or set cni_plugin_dir in brig.toml), or run with --network none")]
    MissingPlugin { plugin: String, dir: PathBuf },
    #[error("CNI plugin {plugin} ({command}) failed: {message}")]
    Plugin {
        plugin: String,
        command: &'static str,
        message: String,
    },
}

/// The bridge network: `BRIDGE` as the gateway of `subnet`, addresses from host-local, the
/// pod's traffic masqueraded to the outside, published ports by portmap.
pub fn bridge_conflist(subnet: &str) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
}

/// Create sandbox `id`'s namespace at `netns` and run CNI ADD on it. On failure nothing is
/// left.
pub fn setup(
    netns: &Path,
    id: &str,
    conflist: Value,
    plugin_dir: &Path,
    ports: Vec<PortMapping>,
) -> Result<CniRecord, CniError> {
    for plugin in plugins(&conflist) {
        let kind = plugin["type"].as_str().unwrap_or_default();
        if !plugin_dir.join(kind).is_file() {
            return Err(CniError::MissingPlugin {
                plugin: kind.into(),
                dir: plugin_dir.into(),
            });
        }
    }
    create_netns(netns).map_err(|source| CniError::Netns {
        path: netns.into(),
        source,
    })?;
    let mut record = CniRecord {
        netns: netns.into(),
        container_id: id.into(),
        conflist,
        plugin_dir: plugin_dir.into(),
        ports,
        result: Value::Null,
    };
    let mut prev = Value::Null;
    for plugin in plugins(&record.conflist) {
        match run_plugin(&record, &plugin, "ADD", &prev) {
            Ok(result) => prev = result,
            Err(e) => {
                teardown(&record);
                return Err(e);
            }
        }
    }
    record.result = prev;
    Ok(record)
}

/// Run CNI DEL (last plugin first) and remove the namespace. Best effort: a step that fails
/// is logged and the rest still run.
pub fn teardown(record: &CniRecord) {
    let mut list = plugins(&record.conflist);
    list.reverse();
    for plugin in list {
        if let Err(e) = run_plugin(record, &plugin, "DEL", &record.result) {
            tracing::warn!("{e}");
        }
    }
    remove_netns(&record.netns);
}

fn plugins(conflist: &Value) -> Vec<Value> {
    conflist["plugins"].as_array().cloned().unwrap_or_default()
}

/// Execute one plugin as the CNI spec says: the command and the sandbox in the environment,
/// the plugin's configuration (with the list's name and version, the previous result and
/// the runtime config it has the capabilities for) on stdin, the result on stdout.
fn run_plugin(
    record: &CniRecord,
    plugin: &Value,
    command: &'static str,
    prev: &Value,
) -> Result<Value, CniError> {
    let kind = plugin["type"].as_str().unwrap_or_default().to_string();
    let mut conf = plugin.clone();
    conf["name"] = record.conflist["name"].clone();
    conf["cniVersion"] = record.conflist["cniVersion"].clone();
    if !prev.is_null() {
        conf["prevResult"] = prev.clone();
    }
    if plugin["capabilities"]["portMappings"] == json!(true) {
        let ports: Vec<Value> = record
            .ports
            .iter()
            .map(|p| {
                json!({"hostPort": p.host_port, "containerPort": p.container_port, "protocol": p.protocol})
            })
            .collect();
        conf["runtimeConfig"] = json!({ "portMappings": ports });
    }
    let failed = |message: String| CniError::Plugin {
        plugin: kind.clone(),
        command,
        message,
    };
    let mut child = Command::new(record.plugin_dir.join(&kind))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &record.container_id)
        .env("CNI_NETNS", &record.netns)
        .env("CNI_IFNAME", IFNAME)
        .env("CNI_PATH", &record.plugin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(conf.to_string().as_bytes())
            .map_err(|e| failed(format!("writing its configuration: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // Errors are JSON on stdout ({"code", "msg", "details"}), or text on stderr.
        let parsed: Option<Value> = serde_json::from_str(&stdout).ok();
        let message = match parsed {
            Some(v) => format!(
                "{} {}",
                v["msg"].as_str().unwrap_or_default(),
                v["details"].as_str().unwrap_or_default()
            ),
            None => format!(
                "{} {}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        };
        return Err(failed(crate::guest_text::escape(
            message.trim(),
            2048,
            false,
        )));
    }
    if command == "DEL" || stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).map_err(|e| failed(format!("its result is not JSON: {e}")))
}

/// A new network namespace kept alive by a bind mount on `path` (as `ip netns add` does).
fn create_netns(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    // unshare changes only the calling thread's namespace: do it on a thread of its own.
    let made = std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread panicked")));
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

fn remove_netns(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("removing {}: {e}", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse_as_docker_writes_them() {
        let p: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.protocol.as_str()),
            (8080, 80, "tcp")
        );
        let p: PortMapping = "5353:53/udp".parse().unwrap();
        assert_eq!(p.protocol, "udp");
        for bad in ["80", "0:80", "8080:", "a:b", "8080:80/sctp", "70000:80"] {
            let err = bad.parse::<PortMapping>().unwrap_err();
            assert!(err.contains("HOST_PORT:CONTAINER_PORT"), "{bad}: {err}");
        }
    }

    #[test]
    fn exposed_ports_get_free_host_ports_and_show_as_docker_port_does() {
        let web = PortMapping::exposed("80/tcp").unwrap();
        assert_eq!((web.container_port, web.protocol.as_str()), (80, "tcp"));
        assert_ne!(web.host_port, 0);
        // Free: we can listen there ourselves.
        std::net::TcpListener::bind(("0.0.0.0", web.host_port)).unwrap();
        let dns = PortMapping::exposed("53/udp").unwrap();
        assert_eq!((dns.container_port, dns.protocol.as_str()), (53, "udp"));
        std::net::UdpSocket::bind(("0.0.0.0", dns.host_port)).unwrap();
        assert_eq!(PortMapping::exposed("8080").unwrap().protocol, "tcp");
        assert_eq!(
            web.to_string(),
            format!("80/tcp -> 0.0.0.0:{}", web.host_port)
        );
        for bad in ["", "0/tcp", "80/sctp", "http", "70000"] {
            let err = PortMapping::exposed(bad).unwrap_err();
            assert!(err.contains("PORT[/tcp|/udp]"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_plugin_is_named_with_the_fix_before_anything_is_made() {
        let netns = std::env::temp_dir().join(format!("brig-cni-missing-{}", std::process::id()));
        let err = setup(
            &netns,
            "x",
            bridge_conflist("10.89.0.0/24"),
            Path::new("/nonexistent/cni"),
            vec![],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("containernetworking-plugins") && text.contains("--network none"),
            "{text}"
        );
        assert!(!netns.exists());
    }
}

//! The guest's network, made to look like the pod's (`ConfigureNetwork`): loopback up; the
//! virtio-net interface found by the MAC the host gave it, renamed, sized and brought up
//! with the pod's addresses; then the pod's routes and static neighbours. Every container
//! of the pod shares this network namespace (the guest's own).
//!
//! The host's request is checked whole before anything changes.

use std::net::IpAddr;

use brig_protocols::agent::{ConfigureNetworkRequest, IpNet};
use futures_util::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::RouteScope;
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Longest interface name (IFNAMSIZ less the NUL).
const MAX_IFNAME: usize = 15;
/// Most entries of each kind in one request.
const MAX_ENTRIES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0}")]
    Invalid(String),
    #[error("no interface has MAC {0}")]
    NoSuchMac(String),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
}

/// A checked interface.
struct Nic {
    mac: [u8; 6],
    name: String,
    mtu: u32,
    addresses: Vec<(IpAddr, u8)>,
}

struct Route {
    destination: Option<(IpAddr, u8)>,
    gateway: Option<IpAddr>,
    device: String,
    source: Option<IpAddr>,
    scope: u8,
}

struct Neighbor {
    address: IpAddr,
    mac: [u8; 6],
    device: String,
}

fn invalid(what: impl Into<String>) -> NetworkError {
    NetworkError::Invalid(what.into())
}

fn mac_of(bytes: &[u8], what: &str) -> Result<[u8; 6], NetworkError> {
    bytes
        .try_into()
        .map_err(|_| invalid(format!("{what}: a MAC has 6 bytes, not {}", bytes.len())))
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_of(text: &str, what: &str) -> Result<IpAddr, NetworkError> {
    text.parse()
        .map_err(|_| invalid(format!("{what}: {text:?} is not an IP address")))
}

fn net_of(net: &IpNet, what: &str) -> Result<(IpAddr, u8), NetworkError> {
    let ip = ip_of(&net.address, what)?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = u8::try_from(net.prefix)
        .ok()
        .filter(|p| *p <= max)
        .ok_or_else(|| invalid(format!("{what}: prefix {} is over {max}", net.prefix)))?;
    Ok((ip, prefix))
}

fn opt_ip(text: &str, what: &str) -> Result<Option<IpAddr>, NetworkError> {
    if text.is_empty() {
        Ok(None)
    } else {
        ip_of(text, what).map(Some)
    }
}

struct Checked {
    nics: Vec<Nic>,
    routes: Vec<Route>,
    neighbors: Vec<Neighbor>,
}

fn check(req: &ConfigureNetworkRequest) -> Result<Checked, NetworkError> {
    if req.interfaces.len() > MAX_ENTRIES
        || req.routes.len() > MAX_ENTRIES
        || req.neighbors.len() > MAX_ENTRIES
    {
        return Err(invalid(format!(
            "at most {MAX_ENTRIES} interfaces, routes and neighbours"
        )));
    }
    let mut nics = Vec::new();
    for (i, nic) in req.interfaces.iter().enumerate() {
        let what = format!("interface {i}");
        let name = &nic.name;
        if name.is_empty()
            || name.len() > MAX_IFNAME
            || name == "lo"
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid(format!(
                "{what}: name {name:?} is not a valid interface name (1-{MAX_IFNAME} letters, digits, - _ .)"
            )));
        }
        if !(68..=65535).contains(&nic.mtu) {
            return Err(invalid(format!(
                "{what}: MTU {} is not in 68..65535",
                nic.mtu
            )));
        }
        let addresses = nic
            .addresses
            .iter()
            .map(|a| net_of(a, &what))
            .collect::<Result<Vec<_>, _>>()?;
        nics.push(Nic {
            mac: mac_of(&nic.mac, &what)?,
            name: name.clone(),
            mtu: nic.mtu,
            addresses,
        });
    }
    let known = |device: &str, what: &str| {
        if nics.iter().any(|n| n.name == device) {
            Ok(device.to_string())
        } else {
            Err(invalid(format!(
                "{what}: device {device:?} is not one of the interfaces"
            )))
        }
    };
    let mut routes = Vec::new();
    for (i, r) in req.routes.iter().enumerate() {
        let what = format!("route {i}");
        let destination = match r.destination.as_ref() {
            Some(d) if !d.address.is_empty() => Some(net_of(d, &what)?),
            _ => None,
        };
        let gateway = opt_ip(&r.gateway, &what)?;
        if destination.is_none() && gateway.is_none() {
            return Err(invalid(format!("{what}: a default route needs a gateway")));
        }
        let family = |ip: &IpAddr| ip.is_ipv4();
        if let (Some((d, _)), Some(g)) = (&destination, &gateway) {
            if family(d) != family(g) {
                return Err(invalid(format!(
                    "{what}: destination and gateway differ in family"
                )));
            }
        }
        routes.push(Route {
            destination,
            gateway,
            device: known(&r.device, &what)?,
            source: opt_ip(&r.source, &what)?,
            scope: u8::try_from(r.scope)
                .map_err(|_| invalid(format!("{what}: scope {} is over 255", r.scope)))?,
        });
    }
    let mut neighbors = Vec::new();
    for (i, n) in req.neighbors.iter().enumerate() {
        let what = format!("neighbour {i}");
        neighbors.push(Neighbor {
            address: ip_of(&n.address, &what)?,
            mac: mac_of(&n.mac, &what)?,
            device: known(&n.device, &what)?,
        });
    }
    Ok(Checked {
        nics,
        routes,
        neighbors,
    })
}

/// Apply `req` (see the module comment).
pub fn configure(req: &ConfigureNetworkRequest) -> Result<(), NetworkError> {
    let checked = check(req)?;
    with_netlink(|handle| async move { apply(&handle, checked).await })
}

/// Bring loopback up: containers of a pod talk over it, and the guest kernel leaves it down.
pub fn loopback_up() -> Result<(), NetworkError> {
    with_netlink(|handle| async move {
        let links = links(&handle).await?;
        if let Some(lo) = links.iter().find(|l| name_of(l) == Some("lo")) {
            set_up(&handle, lo.header.index, "lo").await?;
        }
        Ok(())
    })
}

fn with_netlink<F, Fut>(body: F) -> Result<(), NetworkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: std::future::Future<Output = Result<(), NetworkError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let conn = tokio::spawn(connection);
        let out = body(handle).await;
        conn.abort();
        out
    })
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |source| NetworkError::Netlink { what, source }
}

/// EEXIST is fine when setting something up again.
fn exists_ok(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::EEXIST => Ok(()),
        other => other,
    }
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetworkError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing interfaces"))
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

async fn set_up(handle: &Handle, index: u32, name: &str) -> Result<(), NetworkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("bringing {name} up")))
}

async fn apply(handle: &Handle, checked: Checked) -> Result<(), NetworkError> {
    let existing = links(handle).await?;
    if let Some(lo) = existing.iter().find(|l| name_of(l) == Some("lo")) {
        set_up(handle, lo.header.index, "lo").await?;
    }
    let mut index_of = std::collections::HashMap::new();
    for nic in &checked.nics {
        let link = existing
            .iter()
            .find(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::Address(m) if m.as_slice() == nic.mac))
            })
            .ok_or_else(|| NetworkError::NoSuchMac(mac_text(&nic.mac)))?;
        let index = link.header.index;
        // Renamed while down (the kernel refuses to rename a running interface).
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .down()
                    .name(nic.name.clone())
                    .mtu(nic.mtu)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("naming {} {}", mac_text(&nic.mac), nic.name)))?;
        set_up(handle, index, &nic.name).await?;
        for (ip, prefix) in &nic.addresses {
            exists_ok(handle.address().add(index, *ip, *prefix).execute().await)
                .map_err(nl(format!("adding {ip}/{prefix} to {}", nic.name)))?;
        }
        index_of.insert(nic.name.clone(), index);
    }
    // Directly connected routes first: gateways must be reachable when theirs are added.
    let mut routes = checked.routes;
    routes.sort_by_key(|r| r.gateway.is_some());
    for r in &routes {
        let index = index_of[&r.device];
        let ipv4 = r
            .destination
            .map(|(d, _)| d.is_ipv4())
            .or(r.gateway.map(|g| g.is_ipv4()))
            .unwrap_or(true);
        let mut b = RouteMessageBuilder::<IpAddr>::new();
        // The builder learns the family from a destination only; a default route has none.
        b.get_mut().header.address_family = if ipv4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        if let Some((d, p)) = r.destination {
            b = b
                .destination_prefix(d, p)
                .map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(g) = r.gateway {
            b = b.gateway(g).map_err(|e| invalid(e.to_string()))?;
        }
        if let Some(s) = r.source {
            b = b.pref_source(s).map_err(|e| invalid(e.to_string()))?;
        }
        let msg = b
            .output_interface(index)
            .scope(RouteScope::from(r.scope))
            .build();
        exists_ok(handle.route().add(msg).execute().await).map_err(nl(format!(
            "adding the route to {} via {}",
            r.destination
                .map(|(d, p)| format!("{d}/{p}"))
                .unwrap_or_else(|| "default".into()),
            r.gateway
                .map(|g| g.to_string())
                .unwrap_or_else(|| r.device.clone())
        )))?;
    }
    for n in &checked.neighbors {
        handle
            .neighbours()
            .add(index_of[&n.device], n.address)
            .link_layer_address(&n.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl(format!("adding the neighbour {}", n.address)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use brig_protocols::agent::{Interface, Neighbor as PbNeighbor, Route as PbRoute};

    use super::*;

    fn nic() -> Interface {
        Interface {
            mac: vec![2, 0x42, 10, 88, 0, 5],
            name: "eth0".into(),
            mtu: 1500,
            addresses: vec![IpNet {
                address: "10.88.0.5".into(),
                prefix: 16,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn request() -> ConfigureNetworkRequest {
        ConfigureNetworkRequest {
            interfaces: vec![nic()],
            routes: vec![PbRoute {
                gateway: "10.88.0.1".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            neighbors: vec![PbNeighbor {
                address: "10.88.0.9".into(),
                mac: vec![2, 0, 0, 0, 0, 9],
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn rejected(req: &ConfigureNetworkRequest) -> String {
        match check(req) {
            Err(NetworkError::Invalid(m)) => m,
            Err(e) => panic!("not an invalid-argument error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn a_pod_network_as_cni_makes_it_is_accepted() {
        let c = check(&request()).unwrap();
        assert_eq!(
            c.nics[0].addresses,
            vec![("10.88.0.5".parse().unwrap(), 16)]
        );
        assert_eq!(c.routes[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert!(c.routes[0].destination.is_none());
    }

    #[test]
    fn malformed_fields_are_named() {
        let mut r = request();
        r.interfaces[0].mac = vec![1, 2, 3];
        assert!(rejected(&r).contains("6 bytes"));
        let mut r = request();
        r.interfaces[0].name = "eth0; reboot".into();
        assert!(rejected(&r).contains("not a valid interface name"));
        let mut r = request();
        r.interfaces[0].name = "lo".into();
        assert!(rejected(&r).contains("interface name"));
        let mut r = request();
        r.interfaces[0].mtu = 9_000_000;
        assert!(rejected(&r).contains("MTU"));
        let mut r = request();
        r.interfaces[0].addresses[0].prefix = 33;
        assert!(rejected(&r).contains("prefix 33"));
        let mut r = request();
        r.interfaces[0].addresses[0].address = "10.88.0.300".into();
        assert!(rejected(&r).contains("not an IP address"));
        let mut r = request();
        r.routes[0].device = "eth9".into();
        assert!(rejected(&r).contains("eth9"));
        let mut r = request();
        r.routes[0].gateway = String::new();
        assert!(rejected(&r).contains("needs a gateway"));
        let mut r = request();
        r.routes[0].destination = Some(IpNet {
            address: "fd00::".into(),
            prefix: 64,
            ..Default::default()
        })
        .into();
        assert!(rejected(&r).contains("family"));
        let mut r = request();
        r.neighbors[0].mac = vec![];
        assert!(rejected(&r).contains("neighbour 0"));
        let mut r = request();
        r.routes = vec![r.routes[0].clone(); MAX_ENTRIES + 1];
        assert!(rejected(&r).contains("at most"));
    }
}

//! Pod networking on the host, in the manner of Kata's "tcfilter" model.
//!
//! CNI makes the pod's network namespace and puts one interface in it (a veth, usually
//! `eth0`) with the pod's addresses and routes. [`attach`] reads that interface over netlink,
//! creates a TAP device beside it, and has tc move every frame between the two: an ingress
//! qdisc on each and a u32 match-all filter whose `mirred egress redirect` action sends what
//! arrives on one out of the other. The VMM's virtio-net device reads and writes the TAP
//! (its file descriptor is the one [`attach`] opened), the guest's interface takes the veth's
//! MAC, addresses and routes (the agent's `ConfigureNetwork`), and so the guest is the pod to
//! everything outside the namespace.
//!
//! Nothing is left behind: the TAP is not persistent, so it (with its qdisc and filter)
//! disappears when the last holder of its descriptor, the VMM, exits; [`detach`] removes the
//! veth's qdisc; and the veth itself is CNI's to remove.

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Name of the TAP device in the pod's namespace.
pub const TAP_NAME: &str = "tap0_brig";
/// `ETH_P_ALL` (0x0003) in network byte order, as tc wants a filter's protocol.
const ETH_P_ALL_BE: u16 = 0x0003_u16.to_be();
/// The ingress qdisc's handle (`ffff:`), also the parent of filters attached to it.
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

/// An address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    pub address: IpAddr,
    pub prefix: u8,
}

/// The pod's interface, as the guest must have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Name in the pod's namespace (the guest names its interface the same).
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Global and site addresses (link-local ones the guest makes itself).
    pub addresses: Vec<IpNet>,
}

/// A route of the pod's main table through its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None` for the default route.
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    /// `RT_SCOPE_*`.
    pub scope: u8,
}

/// A permanent neighbour entry of the pod's interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    pub address: IpAddr,
    pub mac: [u8; 6],
}

/// What the guest's network must look like: the pod's interface, routes and neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub interface: Interface,
    pub routes: Vec<Route>,
    pub neighbors: Vec<Neighbor>,
}

/// The pod's network wired to a TAP: the TAP's descriptor goes to the VMM.
#[derive(Debug)]
pub struct Attached {
    /// What the guest configures.
    pub network: PodNetwork,
    /// The TAP (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), close-on-exec.
    pub tap: OwnedFd,
}

/// Pod networking failures.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot enter the pod's network namespace {path}: {source} (did CNI create it?)")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("network namespace {path}: {what}: {source}")]
    Netlink {
        path: PathBuf,
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("network namespace {path}: creating the TAP device: {source} (is /dev/net/tun there and the tun module loaded?)")]
    Tap {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "network namespace {path}: interface {name} has a MAC of {len} bytes, not an Ethernet one"
    )]
    Mac {
        path: PathBuf,
        name: String,
        len: usize,
    },
    #[error("the pod networking thread failed: {0}")]
    Thread(String),
}

/// Wire the pod interface of the network namespace at `netns` to a new TAP. `None` when
/// the namespace has no interface but loopback (a pod without a network): the guest then
/// has loopback only, as such a runc pod would.
pub fn attach(netns: &Path) -> Result<Option<Attached>, NetError> {
    let path = netns.to_path_buf();
    in_netns(netns, move |handle| async move {
        attach_in(&path, handle).await
    })?
}

/// Undo what [`attach`] did to the pod's interface (the TAP goes with the VMM). A namespace
/// or interface that is gone already is fine: CNI may have removed it first.
pub fn detach(netns: &Path) -> Result<(), NetError> {
    if !netns.exists() {
        return Ok(());
    }
    let path = netns.to_path_buf();
    in_netns(netns, move |handle| async move {
        let links: Vec<LinkMessage> =
            handle
                .link()
                .get()
                .execute()
                .try_collect()
                .await
                .map_err(|source| NetError::Netlink {
                    path: path.clone(),
                    what: "listing interfaces",
                    source,
                })?;
        let Some(link) = links.iter().find(|l| is_pod_interface(l)) else {
            return Ok(());
        };
        remove_ingress(&handle, link.header.index)
            .await
            .map_err(|source| NetError::Netlink {
                path,
                what: "removing the ingress qdisc",
                source,
            })
    })?
}

/// Remove interface `index`'s ingress qdisc (and so its filters); none there is fine.
async fn remove_ingress(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    let mut del = handle.qdisc().del(index_i32(index));
    del.message_mut().header.parent = INGRESS_HANDLE.into();
    del.message_mut().header.handle = INGRESS_HANDLE.into();
    match del.execute().await {
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(e.raw_code().abs(), libc::ENOENT | libc::EINVAL) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// The pod's interface: the first Ethernet one that is not a TAP of ours.
fn is_pod_interface(link: &LinkMessage) -> bool {
    link.header.link_layer_type == LinkLayerType::Ether
        && link_name(link).is_some_and(|n| n != TAP_NAME)
}

/// Whether this kernel can do what [`attach`] does (an ingress qdisc, a u32 filter with a
/// mirred redirect), tried in a throwaway network namespace; the kernel loads the modules
/// on demand. Needs CAP_SYS_ADMIN (root).
pub fn probe_tc() -> Result<(), String> {
    let thread = std::thread::spawn(|| -> Result<(), String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("cannot make a network namespace to try tc in: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
            let conn = tokio::spawn(connection);
            // Loopback is interface 1 in a new namespace.
            let result = async {
                handle
                    .qdisc()
                    .replace(1)
                    .ingress()
                    .execute()
                    .await
                    .map_err(|e| format!("ingress qdisc (sch_ingress): {e}"))?;
                handle
                    .traffic_filter(1)
                    .add()
                    .parent(INGRESS_HANDLE)
                    .priority(1)
                    .protocol(ETH_P_ALL_BE)
                    .redirect(1)
                    .map_err(|e| e.to_string())?
                    .execute()
                    .await
                    .map_err(|e| {
                        format!("u32 filter with mirred redirect (cls_u32, act_mirred): {e}")
                    })
            }
            .await;
            conn.abort();
            result
        })
    });
    thread
        .join()
        .unwrap_or_else(|_| Err("the probe panicked".into()))
}

/// Run `body` with a netlink handle inside the network namespace `netns`, on a thread of its
/// own (setns changes only the calling thread, and no other work may land in the pod's
/// namespace).
fn in_netns<T, F, Fut>(netns: &Path, body: F) -> Result<T, NetError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let ns = File::open(netns).map_err(|source| NetError::Netns {
        path: netns.to_path_buf(),
        source,
    })?;
    let path = netns.to_path_buf();
    let thread = std::thread::Builder::new()
        .name("brig-netns".into())
        .spawn(move || -> Result<T, NetError> {
            let netns_err = |source| NetError::Netns {
                path: path.clone(),
                source,
            };
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| netns_err(e.into()))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(netns_err)?;
            rt.block_on(async move {
                // The netlink socket is made here, so it belongs to the pod's namespace.
                let (connection, handle, _) = rtnetlink::new_connection().map_err(netns_err)?;
                let conn = tokio::spawn(connection);
                let out = body(handle).await;
                conn.abort();
                Ok(out)
            })
        })
        .map_err(|e| NetError::Thread(e.to_string()))?;
    thread
        .join()
        .map_err(|_| NetError::Thread("it panicked".into()))?
}

fn index_i32(index: u32) -> i32 {
    i32::try_from(index).unwrap_or(i32::MAX)
}

async fn link_by_name(handle: &Handle, name: &str) -> Option<LinkMessage> {
    handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

async fn attach_in(path: &Path, handle: Handle) -> Result<Option<Attached>, NetError> {
    let nl = |what: &'static str| {
        let path = path.to_path_buf();
        move |source| NetError::Netlink { path, what, source }
    };
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing interfaces"))?;
    let Some(veth) = links.into_iter().find(is_pod_interface) else {
        return Ok(None);
    };
    let index = veth.header.index;
    let name = link_name(&veth).unwrap_or_default().to_string();
    let mut mac = None;
    let mut mtu = 1500;
    for attr in &veth.attributes {
        match attr {
            LinkAttribute::Address(a) => mac = Some(a.clone()),
            LinkAttribute::Mtu(m) => mtu = *m,
            _ => {}
        }
    }
    let mac = mac.unwrap_or_default();
    let mac: [u8; 6] = mac.as_slice().try_into().map_err(|_| NetError::Mac {
        path: path.to_path_buf(),
        name: name.clone(),
        len: mac.len(),
    })?;

    let addresses = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(nl("listing addresses"))?
        .into_iter()
        .filter(|a| a.header.scope != AddressScope::Link && a.header.scope != AddressScope::Host)
        .filter_map(|a| {
            let prefix = a.header.prefix_len;
            // IPv4 has the interface's own address in IFA_LOCAL (IFA_ADDRESS is the peer's
            // on point-to-point links); IPv6 only in IFA_ADDRESS.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            local.or(addr).map(|address| IpNet { address, prefix })
        })
        .collect();

    let mut routes = Vec::new();
    for query in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let found: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        routes.extend(found.iter().filter_map(|r| pod_route(r, index)));
    }

    let neighbors = handle
        .neighbours()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(nl("listing neighbours"))?
        .into_iter()
        .filter(|n| n.header.ifindex == index && n.header.state == NeighbourState::Permanent)
        .filter_map(|n| {
            let address = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                    Some(IpAddr::V4(*ip))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(ip)) => {
                    Some(IpAddr::V6(*ip))
                }
                _ => None,
            })?;
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
                _ => None,
            })?;
            Some(Neighbor { address, mac })
        })
        .collect();

    let tap = open_tap(TAP_NAME).map_err(|source| NetError::Tap {
        path: path.to_path_buf(),
        source,
    })?;
    let tap_link = link_by_name(&handle, TAP_NAME)
        .await
        .ok_or_else(|| NetError::Tap {
            path: path.to_path_buf(),
            source: std::io::Error::other("the new TAP is not listed"),
        })?;
    let tap_index = tap_link.header.index;
    let wired = wire(&handle, index, tap_index, mtu).await;
    if let Err(e) = wired {
        // The TAP goes when its descriptor is closed; the veth's qdisc must go now.
        let _ = remove_ingress(&handle, index).await;
        return Err(nl("redirecting traffic between the interface and the TAP")(
            e,
        ));
    }
    Ok(Some(Attached {
        network: PodNetwork {
            interface: Interface {
                name,
                mac,
                mtu,
                addresses,
            },
            routes,
            neighbors,
        },
        tap,
    }))
}

/// The TAP up with the pod's MTU, and every frame redirected both ways.
async fn wire(handle: &Handle, veth: u32, tap: u32, mtu: u32) -> Result<(), rtnetlink::Error> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(tap).mtu(mtu).up().build())
        .execute()
        .await?;
    for (from, to) in [(veth, tap), (tap, veth)] {
        handle
            .qdisc()
            .replace(index_i32(from))
            .ingress()
            .execute()
            .await?;
        // priority() rewrites the whole info word: protocol must come after it.
        handle
            .traffic_filter(index_i32(from))
            .add()
            .parent(INGRESS_HANDLE)
            .priority(1)
            .protocol(ETH_P_ALL_BE)
            .redirect(to)?
            .execute()
            .await?;
    }
    Ok(())
}

/// A unicast route of the main table through interface `index` that the guest must add
/// itself: those the kernel makes from the addresses (protocol `kernel`) it makes too.
fn pod_route(r: &RouteMessage, index: u32) -> Option<Route> {
    let h = &r.header;
    if h.table != RT_TABLE_MAIN
        || h.kind != RouteType::Unicast
        || h.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    };
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(a) => destination = ip(a),
            RouteAttribute::Gateway(a) => gateway = ip(a),
            RouteAttribute::PrefSource(a) => source = ip(a),
            _ => {}
        }
    }
    if oif != Some(index) {
        return None;
    }
    // IPv6 link-local and multicast routes belong to the guest's own kernel.
    if let Some(IpAddr::V6(d)) = destination {
        if (d.segments()[0] & 0xffc0) == 0xfe80 || d.is_multicast() {
            return None;
        }
    }
    Some(Route {
        destination: destination.map(|address| IpNet {
            address,
            prefix: h.destination_prefix_length,
        }),
        gateway,
        source,
        scope: h.scope.into(),
    })
}

/// `02:42:0a:58:00:05`.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

nix::ioctl_write_ptr_bad!(tun_set_iff, 0x4004_54ca, libc::ifreq);

/// Open a new (non-persistent) TAP named `name` with the virtio-net header on each frame.
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(std::io::Error::other("TAP name too long"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = libc::c_char::try_from(*src).unwrap_or(b'_' as libc::c_char);
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    req.ifr_ifru.ifru_flags = libc::c_short::try_from(flags).unwrap_or(0);
    // SAFETY: TUNSETIFF reads one ifreq, which lives across the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &req) }.map_err(std::io::Error::from)?;
    Ok(OwnedFd::from(tun))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_protocol_is_eth_p_all_in_network_order() {
        assert_eq!(ETH_P_ALL_BE.to_ne_bytes(), [0x00, 0x03]);
    }

    #[test]
    fn a_namespace_that_does_not_exist_is_named_in_the_error() {
        let err = attach(Path::new("/nonexistent/netns")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/netns"), "{text}");
        assert!(text.contains("CNI"), "{text}");
    }
}

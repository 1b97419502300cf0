//! The host side of virtio-net: a TAP device opened with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, so each read or write is one Ethernet frame preceded by a 12-byte
//! `virtio_net_hdr_v1`, exactly what the guest puts in its queues.
//!
//! The TAP is either inherited from the parent (`--net fd=N`, checked with `TUNGETIFF`) or
//! opened here from `/dev/net/tun` (`--net tap=NAME`, in the VMM's network namespace and
//! before any confinement: `/dev` is not visible afterwards). Tests and fuzzing use a
//! socket that keeps frame boundaries instead ([`Tap::from_frame_socket`]).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::frame::NET_HDR_LEN;

/// `IFNAMSIZ`: an interface name and its NUL.
const IFNAMSIZ: usize = 16;
/// The flags a Brig TAP must have.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Why the TAP cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and /dev/net/tun present?)")]
    OpenTun(io::Error),
    #[error("cannot attach to or create TAP {name}: {source} (creating one needs CAP_NET_ADMIN in the VMM's network namespace)")]
    Attach { name: String, source: io::Error },
    #[error("descriptor {fd} is not a usable TAP: {reason}")]
    NotTap { fd: RawFd, reason: String },
    #[error("setting up the TAP ({what}) failed: {source}")]
    Setup {
        what: &'static str,
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: the name and the flags (the rest of
/// the 40-byte union is padding here).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new() -> Self {
        Self {
            name: [0; IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        }
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// What kind of descriptor carries the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tap,
    FrameSocket,
}

/// The descriptor the net device reads frames from and writes frames to (non-blocking).
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    kind: Kind,
    name: String,
}

/// The name and flags of the TAP behind `fd`, from `TUNGETIFF`; an error if `fd` is not
/// open, not a TUN/TAP, or lacks one of `IFF_TAP`, `IFF_NO_PI`, `IFF_VNET_HDR`.
pub fn check_tap_fd(fd: RawFd) -> Result<String, TapError> {
    let mut req = IfReq::new();
    // SAFETY: TUNGETIFF writes at most a `struct ifreq` (40 bytes, the size of `req`) through
    // the pointer; on a number that is not open, or not a TAP, it fails without writing.
    let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        let reason = match e.raw_os_error() {
            Some(libc::EBADF) => {
                "it is not open (the parent must clear close-on-exec on it before starting the VMM)"
                    .into()
            }
            Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EBADFD) => {
                "it is not a TUN/TAP device attached to an interface".into()
            }
            _ => format!("TUNGETIFF failed: {e}"),
        };
        return Err(TapError::NotTap { fd, reason });
    }
    let flags = libc::c_int::from(req.flags);
    let missing: Vec<&str> = [
        (libc::IFF_TAP, "IFF_TAP"),
        (libc::IFF_NO_PI, "IFF_NO_PI"),
        (libc::IFF_VNET_HDR, "IFF_VNET_HDR"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit == 0)
    .map(|(_, name)| *name)
    .collect();
    if !missing.is_empty() {
        return Err(TapError::NotTap {
            fd,
            reason: format!(
                "{} was opened without {} (open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR)",
                req.name(),
                missing.join(", ")
            ),
        });
    }
    Ok(req.name())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take and return plain integers.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Attach to TAP `name` in the VMM's network namespace, creating it if it does not exist.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new();
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::Attach {
                name: name.into(),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        req.name[..bytes.len()].copy_from_slice(bytes);
        req.flags = libc::c_short::try_from(TAP_FLAGS).unwrap_or(0);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (the size of `req`).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        Self::prepare(file.into(), req.name())
    }

    /// Take the TAP the parent opened (with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and passed
    /// as descriptor `fd`.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let name = check_tap_fd(fd.as_raw_fd())?;
        set_nonblocking(fd.as_fd()).map_err(|source| TapError::Setup {
            what: "O_NONBLOCK",
            source,
        })?;
        Self::prepare(fd, name)
    }

    /// Frames go over a socket that keeps their boundaries (`SOCK_SEQPACKET` or `SOCK_DGRAM`),
    /// each one a virtio-net header and an Ethernet frame, as on a TAP; offloads are not
    /// set on it. For tests and fuzzing, where no TAP can be created.
    pub fn from_frame_socket(fd: OwnedFd) -> io::Result<Tap> {
        set_nonblocking(fd.as_fd())?;
        Ok(Tap {
            fd,
            kind: Kind::FrameSocket,
            name: String::new(),
        })
    }

    fn prepare(fd: OwnedFd, name: String) -> Result<Tap, TapError> {
        let size = libc::c_int::try_from(NET_HDR_LEN).unwrap_or(0);
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(TapError::Setup {
                what: "TUNSETVNETHDRSZ 12",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            fd,
            kind: Kind::Tap,
            name,
        })
    }

    /// The interface name (empty for a frame socket).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tell the TAP which offloads the reader (the guest) takes: `TUN_F_*` bits, from the
    /// guest's `GUEST_*` features. Runs on the device's event loop thread.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        if self.kind == Kind::FrameSocket {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is touched.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Read one frame (header included) into `buf`; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

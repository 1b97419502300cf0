//! virtio-fs device (virtio spec 1.2 §5.11) served inside the VMM: a FUSE server
//! (`fuse-backend-rs`) over the virtqueues, passing through to one host directory.
//!
//! Threat model: the guest is hostile. It controls every byte of every FUSE request and
//! every descriptor chain.
//! - Descriptor chains are turned into [`Reader`]/[`VirtioFsWriter`] by `fuse-backend-rs`,
//!   which bounds-checks each descriptor against guest memory; a chain it rejects, or a
//!   request it cannot decode, is returned to the guest with used length 0 (logged, no panic).
//! - Nothing may reach outside `shared_dir`. [`PassthroughFs`] holds an `O_PATH` file
//!   descriptor per inode and resolves names one component at a time with
//!   `openat(..., O_NOFOLLOW)` relative to the parent's descriptor, rejects names containing
//!   `/`, maps `..` of the root to the root itself and refuses to open anything but regular
//!   files and directories. We configure it so: `root_dir` is the canonical `shared_dir`,
//!   `do_import` (root inode prepared here, path components validated),
//!   `inode_file_handles` off (no `open_by_handle_at`, which could name any inode on the host
//!   file system), `xattr` off, no DAX window.
//! - Residual risk, not handled here: a *host* process renaming a directory out of
//!   `shared_dir` while the guest holds its inode lets the guest follow it; and
//!   `PassthroughFs::import` sets the process umask to 0 (it must, so the guest's modes are
//!   applied as given). The VMM process is the sandbox boundary. Defence in depth: the
//!   thread serving requests runs under a seccomp filter with file system calls only (no
//!   sockets, no mount, no exec), and the process keeps only the capabilities this server
//!   needs (see `crate::privileges`), and its root is the sandbox directory in a mount
//!   namespace of its own (see `crate::confine`), as virtiofsd pivots into its shared dir.
//!
//! Threads: the transport calls [`VirtioDevice::activate`] and [`VirtioDevice::reset`] from
//! vCPU threads; the device's own event loop thread calls [`MutEventSubscriber::process`],
//! which serves requests synchronously. Both hold the device's mutex (other register
//! accesses do not: the transport copies the identity and config space when it is built).
//! The vCPU side opens no files: a reset only marks the file server stale, and the event
//! loop builds the fresh one.

mod shared_dir_fs;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use tracing::debug;

use crate::guest_warn::guest_warn;

use crate::config::FsCache;
use shared_dir_fs::SharedDirFs;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{
    next_chain, ActivateError, GuestMemory, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_VRING, VIRTIO_RING_F_EVENT_IDX,
};

/// Virtio device ID of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 1024;
/// Length of the `tag` field of the configuration space.
pub const TAG_LEN: usize = 36;
/// Number of request queues (besides the high-priority queue).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Queue indices: the high-priority queue (FORGET, INTERRUPT) and the one request queue.
const HIPRIO_QUEUE: usize = 0;
const REQUEST_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
/// Most chains served per queue and event-loop wakeup, so a busy guest cannot starve the loop.
const CHAINS_PER_RUN: usize = 256;
/// Configuration space length: `tag` + `num_request_queues`.
const CONFIG_LEN: usize = TAG_LEN + 4;

/// Why the virtio-fs device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the virtio-fs tag is empty: give the share a name the guest mounts it by")]
    EmptyTag,
    #[error("the virtio-fs tag is {0} bytes long; it must fit in {TAG_LEN} bytes")]
    TagTooLong(usize),
    #[error("the virtio-fs tag contains a NUL byte; use a plain name")]
    TagContainsNul,
    #[error("shared directory {} does not exist or cannot be reached: {source}", .path.display())]
    DirMissing { path: PathBuf, source: io::Error },
    #[error("shared directory {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("shared directory path {} is not valid UTF-8; use a UTF-8 path", .0.display())]
    NonUtf8Path(PathBuf),
    #[error("cannot set up the file server for {}: {source}", .path.display())]
    Server { path: PathBuf, source: io::Error },
    #[error("cannot create the virtio-fs device's event file descriptors: {0}")]
    EventFd(io::Error),
}

type FileServer = Server<SharedDirFs>;

/// Queues and memory the driver handed over at activation.
struct Active {
    mem: GuestMemory,
    queues: Vec<Queue>,
    irq: Arc<IrqTrigger>,
}

/// The virtio-fs device: one tag, one shared host directory.
pub struct Fs {
    config: [u8; CONFIG_LEN],
    /// Canonical path of the shared directory (what the file server is rooted at).
    shared_dir: PathBuf,
    server: FileServer,
    cache: FsCache,
    queue_evts: Vec<EventFd>,
    wake_evt: EventFd,
    active: Option<Active>,
    /// The driver reset the device: the event loop replaces `server` with a fresh one
    /// before it serves anything else.
    server_stale: bool,
}

impl std::fmt::Debug for Fs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag())
            .field("shared_dir", &self.shared_dir)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// A passthrough file server rooted at `root` (a canonical directory path).
fn new_server(root: &str, cache: FsCache) -> io::Result<FileServer> {
    let cfg = PassthroughConfig {
        root_dir: root.to_owned(),
        do_import: true,
        xattr: false,
        inode_file_handles: false,
        dax_file_size: None,
        writeback: false,
        cache_policy: match cache {
            FsCache::Auto => CachePolicy::Auto,
            FsCache::Metadata => CachePolicy::Metadata,
            FsCache::Never => CachePolicy::Never,
            FsCache::Always => CachePolicy::Always,
        },
        ..PassthroughConfig::default()
    };
    let fs = PassthroughFs::<()>::new(cfg)?;
    fs.import()?;
    Ok(Server::new(SharedDirFs::new(fs, cache == FsCache::Auto)))
}

impl Fs {
    /// A virtio-fs device the guest mounts by `tag` (`mount -t virtiofs <tag> <dir>`),
    /// exporting the host directory `shared_dir` and nothing outside it.
    ///
    /// Fails if the tag is empty, longer than 36 bytes or contains NUL, or if `shared_dir`
    /// does not exist, is not a directory or is not a UTF-8 path.
    pub fn new(tag: &str, shared_dir: PathBuf) -> Result<Fs, FsError> {
        Self::with_cache(tag, shared_dir, FsCache::Auto)
    }

    /// [`Fs::new`] with `cache` deciding what the guest may cache.
    pub fn with_cache(tag: &str, shared_dir: PathBuf, cache: FsCache) -> Result<Fs, FsError> {
        if tag.is_empty() {
            return Err(FsError::EmptyTag);
        }
        if tag.len() > TAG_LEN {
            return Err(FsError::TagTooLong(tag.len()));
        }
        if tag.as_bytes().contains(&0) {
            return Err(FsError::TagContainsNul);
        }
        let canonical =
            std::fs::canonicalize(&shared_dir).map_err(|source| FsError::DirMissing {
                path: shared_dir.clone(),
                source,
            })?;
        let meta = std::fs::metadata(&canonical).map_err(|source| FsError::DirMissing {
            path: shared_dir.clone(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(FsError::NotADirectory(shared_dir));
        }
        let root = canonical
            .to_str()
            .ok_or_else(|| FsError::NonUtf8Path(shared_dir.clone()))?;
        let server = new_server(root, cache).map_err(|source| FsError::Server {
            path: shared_dir.clone(),
            source,
        })?;

        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());

        let make = || EventFd::new(libc::EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(Fs {
            config,
            shared_dir: canonical,
            server,
            cache,
            queue_evts: vec![make()?, make()?],
            wake_evt: make()?,
            active: None,
            server_stale: false,
        })
    }

    /// The tag the guest mounts the share by.
    pub fn tag(&self) -> &str {
        let end = self.config[..TAG_LEN]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(TAG_LEN);
        std::str::from_utf8(&self.config[..end]).unwrap_or("")
    }

    /// The shared directory is now seen at `shared_dir` (the VMM moved into its own root,
    /// see `crate::confine`): the server is rebuilt from there (it opens its root by path
    /// again at FUSE_INIT and at every reset). Call it before the guest runs.
    pub fn rebase(&mut self, shared_dir: PathBuf) -> Result<(), FsError> {
        let root = shared_dir
            .to_str()
            .ok_or_else(|| FsError::NonUtf8Path(shared_dir.clone()))?;
        self.server = new_server(root, self.cache).map_err(|source| FsError::Server {
            path: shared_dir.clone(),
            source,
        })?;
        self.shared_dir = shared_dir;
        Ok(())
    }

    /// The (canonical) host directory the device exports.
    pub fn shared_dir(&self) -> &std::path::Path {
        &self.shared_dir
    }

    /// After a reset: replace the file server with a fresh one (on the event loop thread).
    fn restart_server(&mut self) {
        self.server_stale = false;
        match self
            .shared_dir
            .to_str()
            .map(|root| new_server(root, self.cache))
        {
            Some(Ok(server)) => self.server = server,
            Some(Err(e)) => guest_warn!(
                "virtio-fs: cannot restart the file server for {}, keeping the old one: {e}",
                self.shared_dir.display()
            ),
            None => {}
        }
    }

    /// Ask the event loop to run `process` soon.
    fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            guest_warn!("virtio-fs: cannot wake the event loop: {e}");
        }
    }

    /// Serve the requests the driver has made available on both queues, as the event loop
    /// does when the guest notifies one (at most `CHAINS_PER_RUN` per queue; the event loop
    /// is woken for the rest). The VMM's event loop is the caller; the fuzz target
    /// `fs_requests` drives the device through it.
    pub fn serve_available(&mut self) {
        self.run_queues();
    }

    /// Serve both queues: the high-priority one first.
    fn run_queues(&mut self) {
        let mut more = false;
        for idx in [HIPRIO_QUEUE, REQUEST_QUEUE] {
            more |= self.process_queue(idx);
        }
        if more {
            self.wake();
        }
    }

    /// Serve up to `CHAINS_PER_RUN` requests of queue `idx`. Returns true if it stopped
    /// early with requests left.
    fn process_queue(&mut self, idx: usize) -> bool {
        if self.server_stale {
            self.restart_server();
        }
        let Some(Active { mem, queues, irq }) = self.active.as_mut() else {
            return false;
        };
        let Some(q) = queues.get_mut(idx) else {
            return false;
        };
        let mut used = false;
        let mut handled = 0usize;
        let mut more = false;
        loop {
            if handled >= CHAINS_PER_RUN {
                more = true;
                break;
            }
            let chain = match next_chain(q, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    guest_warn!("virtio-fs: queue {idx} is unusable: {e}");
                    break;
                }
            };
            handled += 1;
            let head = chain.head_index();
            let len = handle_request(&self.server, mem, chain);
            if let Err(e) = q.add_used(&*mem, head, len) {
                guest_warn!("virtio-fs: cannot return a buffer to the guest: {e}");
            }
            used = true;
        }
        if used {
            match q.needs_notification(&*mem) {
                Ok(true) => {
                    if let Err(e) = irq.trigger(VIRTIO_MMIO_INT_VRING) {
                        guest_warn!("virtio-fs: cannot interrupt the guest: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => guest_warn!("virtio-fs: cannot read the queue's notification state: {e}"),
            }
        }
        more
    }
}

/// Hand one FUSE request held in `chain` to the file server; returns the number of bytes
/// written into the chain's device-writable part (0 for requests with no reply and for
/// malformed chains).
fn handle_request<'m>(
    server: &FileServer,
    mem: &'m GuestMemory,
    chain: virtio_queue::DescriptorChain<&'m GuestMemory>,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            guest_warn!("virtio-fs: malformed request descriptors: {e}");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            guest_warn!("virtio-fs: malformed reply descriptors: {e}");
            return 0;
        }
    };
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(n) => u32::try_from(n).unwrap_or(0),
        Err(e) => {
            debug!("virtio-fs: request failed: {e}");
            0
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        // EVENT_IDX: the guest interrupts us, and we it, only when the other side waits
        // (FORGETs and small requests otherwise cost an interrupt each).
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// `struct virtio_fs_config`: tag (36 bytes, NUL padded), num_request_queues (le32).
    fn config_space(&self) -> Vec<u8> {
        self.config.to_vec()
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        irq: Arc<IrqTrigger>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: QUEUE_SIZES.len(),
            });
        }
        for (i, q) in queues.iter().enumerate() {
            if !q.is_valid(&mem) {
                return Err(ActivateError::InvalidQueue(i));
            }
        }
        self.active = Some(Active { mem, queues, irq });
        // The driver may have queued requests before DRIVER_OK.
        self.wake();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // Forget every inode and open file the guest had: a fresh server for the next driver.
        // Not built here: this runs on the vCPU thread that wrote the status register, and a
        // new server opens files, which vCPU threads may not (see `crate::seccomp`). The
        // device's own thread builds it before it serves the next request.
        self.server_stale = true;
        self.wake();
    }
}

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<i32> = self.queue_evts.iter().map(|e| e.as_raw_fd()).collect();
        fds.push(self.wake_evt.as_raw_fd());
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                guest_warn!("virtio-fs: cannot register with the event loop: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(e) = self.queue_evts.iter().find(|e| e.as_raw_fd() == fd) {
            let _ = e.read();
        } else if fd == self.wake_evt.as_raw_fd() {
            let _ = self.wake_evt.read();
        } else {
            guest_warn!("virtio-fs: event on an unknown file descriptor {fd}");
            return;
        }
        self.run_queues();
    }
}

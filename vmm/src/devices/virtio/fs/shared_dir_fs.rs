//! The file system the virtio-fs server serves: the passthrough file system over the
//! shared directory, asking at FUSE_INIT for the large requests Brig wants.
//!
//! FUSE_INIT is negotiated in one place, `fuse-backend-rs`'s server: it enables the options
//! the guest offered and the file system's `init()` asked for, and sets `max_write` and
//! `max_pages` from its own buffer limits (1 MiB, `MAX_BUFFER_SIZE`) when `BIG_WRITES` or
//! `MAX_PAGES` are on. The reply the guest reads is the one the server wrote, so the two
//! cannot disagree on request sizes.
//!
//! Under `fs_cache = "auto"` it also lets the guest keep a file's page cache across opens
//! while the file has not changed (see [`OpenStamps`]), and in every mode it spares the
//! guest a FLUSH when it closes a file it opened read-only (see [`no_flush`]).
//!
//! Every other method of the `FileSystem` trait is handed to the passthrough file system
//! unchanged. The trait gives every method a default that answers ENOSYS, so a method
//! missing here would compile and fail at run time: check the list against the trait's
//! methods when `fuse-backend-rs` is upgraded.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, IoctlData, ListxattrReply,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::PassthroughFs;
use fuse_backend_rs::transport::FsCacheReqHandler;

/// What Brig asks for at FUSE_INIT besides the passthrough file system's own options:
/// requests of up to 1 MiB (the server's buffer size) instead of one 4 KiB page per WRITE
/// and 128 KiB per READ, so that bulk I/O is not a round trip through the VMM per page.
pub(super) const WANTED_AT_INIT: FsOptions = FsOptions::BIG_WRITES.union(FsOptions::MAX_PAGES);

/// The passthrough file system over the shared directory, with Brig's FUSE_INIT wishes.
pub(super) struct SharedDirFs {
    fs: PassthroughFs,
    /// `Some` under `fs_cache = "auto"`.
    stamps: Option<OpenStamps>,
}

impl SharedDirFs {
    /// Serve `fs`; `keep_unchanged`: let the guest keep the page cache of files that did
    /// not change between two opens (for `fs_cache = "auto"`, whose passthrough opens
    /// drop it every time).
    pub(super) fn new(fs: PassthroughFs, keep_unchanged: bool) -> Self {
        Self {
            fs,
            stamps: keep_unchanged.then(OpenStamps::default),
        }
    }
}

/// `FOPEN_NOFLUSH` (FUSE 7.34, Linux 5.16), which fuse-backend-rs 0.14 has no name for:
/// the guest closes the file without a FLUSH request. A close of a file opened read-only
/// has nothing to flush: the guest writes through (no writeback cache) and does POSIX
/// locks itself (the server does not offer `POSIX_LOCKS`), so the FLUSH, a round trip
/// the closing process waits for, only had the passthrough file system close a duplicate
/// of its descriptor. Kernels before 5.16 ignore the bit and flush as before.
fn no_flush() -> OpenOptions {
    const FOPEN_NOFLUSH: u32 = 1 << 5;
    // SAFETY: bitflags 1's `from_bits_unchecked` is unsafe only in that it lets a bit
    // without a name into the set; the set is only serialized, as the OPEN reply's
    // `open_flags`, where this bit is the one the protocol defines.
    unsafe { OpenOptions::from_bits_unchecked(FOPEN_NOFLUSH) }
}

/// How long ago a file must have changed last for its stamp to be trusted: the kernel's
/// change times are coarse (a scheduler tick), so a write in the same tick as our look at
/// the file could leave its times as they were. One older than this cannot be followed by
/// a change that leaves them so.
pub(super) const SETTLED: Duration = Duration::from_secs(2);
/// Stamps kept at most (the guest decides how many files it opens): when full, all are
/// forgotten, which costs the next open of each file one re-read.
const MAX_STAMPS: usize = 1 << 16;

/// What a file looked like when the guest last opened it, by inode.
///
/// Under `auto` the passthrough file system answers an OPEN without `FOPEN_KEEP_CACHE`,
/// so the guest kernel drops the file's page cache on every open and reads it from the
/// host again: close-to-open consistency with whatever the host did to the file. Each
/// open of an unchanged file (a binary or library each exec, a page a web server sends)
/// then costs READ round trips through the VMM. This keeps the consistency and drops the
/// round trips: a read-only open keeps the cache when the file's identity, size, mtime and
/// ctime are what they were at the previous open, and that stamp was taken when the file
/// had been [`SETTLED`] already. Any write, truncation, `utimes` or rename onto the path
/// on the host (or through the guest) moves ctime, which no one can set back.
#[derive(Default)]
struct OpenStamps {
    stamps: Mutex<HashMap<u64, Stamp>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(st: &stat64) -> Self {
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

impl OpenStamps {
    /// Whether `inode`, now `st`, is as it was at its last open; remembers `st` for the
    /// next (if it is settled).
    fn unchanged(&self, inode: u64, st: &stat64) -> bool {
        let stamp = Stamp::of(st);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let changed = Duration::new(
            u64::try_from(st.st_ctime).unwrap_or(u64::MAX),
            u32::try_from(st.st_ctime_nsec)
                .unwrap_or(0)
                .min(999_999_999),
        );
        let settled = now.checked_sub(SETTLED).is_some_and(|t| changed < t);
        let mut stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        let unchanged = stamps.get(&inode) == Some(&stamp);
        if settled {
            if stamps.len() >= MAX_STAMPS && !stamps.contains_key(&inode) {
                stamps.clear();
            }
            stamps.insert(inode, stamp);
        } else {
            stamps.remove(&inode);
        }
        unchanged
    }
}

impl FileSystem for SharedDirFs {
    type Inode = <PassthroughFs as FileSystem>::Inode;
    type Handle = <PassthroughFs as FileSystem>::Handle;

    /// The passthrough file system's wishes plus [`WANTED_AT_INIT`]; the server turns on
    /// those the guest offered and fills in the matching limits itself.
    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        Ok(self.fs.init(capable)? | WANTED_AT_INIT)
    }

    fn destroy(&self) {
        self.fs.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.fs.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.fs.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.fs.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.fs.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.fs.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.fs.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.fs.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.fs.mknod(ctx, inode, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.fs.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.fs.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.fs.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.fs.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.fs.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let (handle, mut options, passthrough) = self.fs.open(ctx, inode, flags, fuse_flags)?;
        // Read-only opens only: one that writes or truncates changes the file anyway.
        let read_only = flags & (libc::O_ACCMODE | libc::O_TRUNC) as u32 == libc::O_RDONLY as u32;
        if !read_only {
            return Ok((handle, options, passthrough));
        }
        options |= no_flush();
        if let (Some(stamps), Some(h)) = (&self.stamps, handle) {
            // A file we cannot stat just keeps the default (the cache is dropped).
            if let Ok((st, _)) = self.fs.getattr(ctx, inode, Some(h)) {
                if stamps.unchanged(inode, &st) {
                    options |= OpenOptions::KEEP_CACHE;
                }
            }
        }
        Ok((handle, options, passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        self.fs.create(ctx, parent, name, args)
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.fs
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.fs.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.fs.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.fs.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.fs.fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.fs
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.fs.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.fs.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.fs.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.fs.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.fs.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.fs.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.fs.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.fs
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.fs.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.fs.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.fs
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.fs.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.fs.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.fs.lseek(ctx, inode, handle, offset, whence)
    }

    /// Query file lock status
    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.fs.getlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file read lock
    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.fs.setlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file write lock
    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.fs.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    /// send ioctl to the file
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.fs
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    /// Query a file's block mapping info
    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.fs.bmap(ctx, inode, block, blocksize)
    }

    /// Poll a file's events
    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.fs.poll(ctx, inode, handle, khandle, flags, events)
    }

    /// Send notify reply.
    fn notify_reply(&self) -> io::Result<()> {
        self.fs.notify_reply()
    }

    #[inline]
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.fs.id_remap(ctx)
    }
}

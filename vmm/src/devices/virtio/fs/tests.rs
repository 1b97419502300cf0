//! Tests for the virtio-fs device: a fake guest driver writes FUSE requests into guest memory
//! as descriptor chains, the device serves its queue, and the test reads the replies back from
//! the used ring, as the guest kernel would.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, EntryOut, FsOptions, InHeader, InitIn, InitOut, OpenIn, OpenOut, OutHeader, WriteIn,
    WriteOut,
};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Guest buffers are allocated from here up.
const BUF_BASE: u64 = 0x10_0000;
const FUSE_INIT: u32 = 26;
const FUSE_LOOKUP: u32 = 1;
const FUSE_WRITE: u32 = 16;
const FUSE_CREATE: u32 = 35;
const FUSE_OPEN: u32 = 14;
/// OpenOut.open_flags: the guest may keep the file's page cache.
const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// OpenOut.open_flags: the guest closes the file without a FLUSH.
const FOPEN_NOFLUSH: u32 = 1 << 5;
const ROOT_ID: u64 = 1;

/// One descriptor as the test driver lays it out: guest address, length, device-writable.
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    write: bool,
}

/// The guest side: memory, the request queue's rings and a bump allocator for buffers.
struct Guest {
    mem: GuestMemoryMmap,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    next_buf: u64,
    fs: Fs,
    unique: u64,
}

impl Guest {
    /// A guest whose driver activated a virtio-fs device sharing `dir`.
    fn new(dir: &Path) -> Self {
        Self::with_device(Fs::new("brig", dir.to_path_buf()).unwrap())
    }

    /// A guest whose driver activated `fs`.
    fn with_device(mut fs: Fs) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let hiprio = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
        let request = MockSplitQueue::create(&mem, GuestAddress(0x8000), QSIZE);
        let queues = vec![
            hiprio.create_queue::<Queue>().unwrap(),
            request.create_queue::<Queue>().unwrap(),
        ];
        let (desc, avail, used) = (
            request.desc_table_addr(),
            request.avail_addr(),
            request.used_addr(),
        );
        let irq = Arc::new(IrqTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        fs.activate(mem.clone(), queues, irq, VIRTIO_F_VERSION_1)
            .unwrap();
        Guest {
            mem,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            next_buf: BUF_BASE,
            fs,
            unique: 0,
        }
    }

    /// Guest memory for `bytes`, returning its address.
    fn buffer(&mut self, bytes: &[u8], len: usize) -> u64 {
        let addr = self.next_buf;
        let mut data = bytes.to_vec();
        data.resize(len.max(bytes.len()), 0);
        self.mem.write_slice(&data, GuestAddress(addr)).unwrap();
        self.next_buf += (data.len() as u64 + 0xfff) & !0xfff;
        addr
    }

    /// Put one chain on the request queue, let the device serve it, and return the used
    /// length it reported.
    fn submit(&mut self, chain: &[Desc]) -> u32 {
        let head = self.next_desc;
        for (i, d) in chain.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let mut flags = if d.write { F_WRITE } else { 0 };
            if i + 1 < chain.len() {
                flags |= F_NEXT;
            }
            let at = self.desc.0 + 16 * u64::from(idx);
            self.mem.write_obj(d.addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            self.mem
                .write_obj(self.next_desc, GuestAddress(at + 14))
                .unwrap();
        }
        let slot = self.avail.0 + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail.0 + 2))
            .unwrap();

        self.fs.process_queue(REQUEST_QUEUE);

        let used_idx: u16 = self.mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap();
        assert_eq!(
            used_idx,
            self.used_seen.wrapping_add(1),
            "the device returns every chain it takes"
        );
        let elem = self.used.0 + 4 + 8 * u64::from(self.used_seen % QSIZE);
        self.used_seen = used_idx;
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        assert_eq!(id, u32::from(head));
        self.mem.read_obj(GuestAddress(elem + 4)).unwrap()
    }

    /// Send a FUSE request (`opcode` on `nodeid` with `body`) with room for `reply_len`
    /// reply bytes; return the reply header and the reply body.
    fn request(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_len: usize,
    ) -> (OutHeader, Vec<u8>) {
        self.unique += 2;
        let header = InHeader {
            len: u32::try_from(std::mem::size_of::<InHeader>() + body.len()).unwrap(),
            opcode,
            unique: self.unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        let mut req = header.as_slice().to_vec();
        req.extend_from_slice(body);
        let out_len = std::mem::size_of::<OutHeader>() + reply_len;
        let req_addr = self.buffer(&req, req.len());
        let reply_addr = self.buffer(&[], out_len);
        let used = self.submit(&[
            Desc {
                addr: req_addr,
                len: u32::try_from(req.len()).unwrap(),
                write: false,
            },
            Desc {
                addr: reply_addr,
                len: u32::try_from(out_len).unwrap(),
                write: true,
            },
        ]);
        let mut reply = vec![0u8; used as usize];
        self.mem
            .read_slice(&mut reply, GuestAddress(reply_addr))
            .unwrap();
        assert!(
            reply.len() >= std::mem::size_of::<OutHeader>(),
            "a reply header"
        );
        let out = OutHeader::from_slice(&reply[..std::mem::size_of::<OutHeader>()])
            .copied()
            .unwrap();
        assert_eq!(out.unique, self.unique, "the reply answers our request");
        assert_eq!(out.len, used, "the header's length is the used length");
        (out, reply[std::mem::size_of::<OutHeader>()..].to_vec())
    }

    fn init(&mut self) -> InitOut {
        self.init_offering(0)
    }

    /// FUSE_INIT where the guest offers `flags`.
    fn init_offering(&mut self, flags: u32) -> InitOut {
        let init = InitIn {
            major: 7,
            minor: 31,
            max_readahead: 1 << 17,
            flags,
        };
        let (out, body) = self.request(
            FUSE_INIT,
            0,
            init.as_slice(),
            std::mem::size_of::<InitOut>(),
        );
        assert_eq!(out.error, 0, "INIT succeeds");
        let mut init_out = InitOut::default();
        let n = body.len().min(std::mem::size_of::<InitOut>());
        init_out.as_mut_slice()[..n].copy_from_slice(&body[..n]);
        init_out
    }

    /// CREATE `name` in directory `parent` for writing: its inode and file handle.
    fn create(&mut self, parent: u64, name: &str) -> (u64, u64) {
        let args = CreateIn {
            flags: u32::try_from(libc::O_RDWR).unwrap(),
            mode: 0o644,
            umask: 0,
            fuse_flags: 0,
        };
        let mut body = args.as_slice().to_vec();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        let (out, reply) = self.request(
            FUSE_CREATE,
            parent,
            &body,
            std::mem::size_of::<EntryOut>() + std::mem::size_of::<OpenOut>(),
        );
        assert_eq!(out.error, 0, "CREATE {name} succeeds");
        let (entry, open) = reply.split_at(std::mem::size_of::<EntryOut>());
        let entry = EntryOut::from_slice(entry).copied().unwrap();
        let open = OpenOut::from_slice(open).copied().unwrap();
        (entry.nodeid, open.fh)
    }

    /// WRITE `data` at offset 0 of open file `fh` of inode `nodeid`: the bytes written, or
    /// the (negative) errno.
    fn write(&mut self, nodeid: u64, fh: u64, data: &[u8]) -> Result<u32, i32> {
        let args = WriteIn {
            fh,
            size: u32::try_from(data.len()).unwrap(),
            ..Default::default()
        };
        let mut body = args.as_slice().to_vec();
        body.extend_from_slice(data);
        let (out, reply) = self.request(FUSE_WRITE, nodeid, &body, std::mem::size_of::<WriteOut>());
        if out.error != 0 {
            return Err(out.error);
        }
        Ok(WriteOut::from_slice(&reply).copied().unwrap().size)
    }

    /// OPEN inode `nodeid` with open(2) `flags`: the reply.
    fn open(&mut self, nodeid: u64, flags: i32) -> OpenOut {
        let args = OpenIn {
            flags: u32::try_from(flags).unwrap(),
            fuse_flags: 0,
        };
        let (out, reply) = self.request(
            FUSE_OPEN,
            nodeid,
            args.as_slice(),
            std::mem::size_of::<OpenOut>(),
        );
        assert_eq!(out.error, 0, "OPEN succeeds");
        OpenOut::from_slice(&reply).copied().unwrap()
    }

    /// LOOKUP `name` in directory `parent`: the entry, or the (negative) errno.
    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (out, reply) =
            self.request(FUSE_LOOKUP, parent, &body, std::mem::size_of::<EntryOut>());
        if out.error != 0 {
            return Err(out.error);
        }
        Ok(EntryOut::from_slice(&reply).copied().unwrap())
    }
}

#[test]
fn init_negotiates_the_fuse_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut guest = Guest::new(dir.path());
    let init = guest.init();
    assert_eq!(init.major, 7);
    assert!(
        init.minor >= 27,
        "minor version {} is too old for virtio-fs",
        init.minor
    );
}

#[test]
fn init_turns_on_one_mebibyte_requests_when_the_guest_offers_them() {
    let big_writes = FsOptions::BIG_WRITES.bits() as u32;
    let max_pages = FsOptions::MAX_PAGES.bits() as u32;
    let dir = tempfile::tempdir().unwrap();
    let init = Guest::new(dir.path()).init_offering(big_writes | max_pages);
    assert_eq!(
        init.flags & (big_writes | max_pages),
        big_writes | max_pages
    );
    assert_eq!((init.max_pages, init.max_write), (256, 1 << 20));

    // Nothing the guest did not offer.
    let init = Guest::new(dir.path()).init();
    assert_eq!(init.flags & (big_writes | max_pages), 0);
    assert!(init.max_write < 1 << 20, "max_write {}", init.max_write);
}

#[test]
fn a_reply_split_over_several_buffers_reaches_the_guest_whole() {
    // The guest posts FUSE_INIT with its reply buffer split in three: 5 bytes, 11 bytes and
    // the rest. The reply the guest reassembles is the same as from one buffer.
    let dir = tempfile::tempdir().unwrap();
    let whole = Guest::new(dir.path()).init();

    let mut guest = Guest::new(dir.path());
    guest.unique += 2;
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 1 << 17,
        flags: 0,
    };
    let mut req = InHeader {
        len: u32::try_from(std::mem::size_of::<InHeader>() + std::mem::size_of::<InitIn>())
            .unwrap(),
        opcode: FUSE_INIT,
        unique: guest.unique,
        ..Default::default()
    }
    .as_slice()
    .to_vec();
    req.extend_from_slice(init.as_slice());
    let reply_len = std::mem::size_of::<OutHeader>() + std::mem::size_of::<InitOut>();
    let parts = [5, 11, reply_len - 16];
    let req_addr = guest.buffer(&req, req.len());
    let mut chain = vec![Desc {
        addr: req_addr,
        len: u32::try_from(req.len()).unwrap(),
        write: false,
    }];
    let mut addrs = Vec::new();
    for len in parts {
        let addr = guest.buffer(&[], len);
        addrs.push((addr, len));
        chain.push(Desc {
            addr,
            len: u32::try_from(len).unwrap(),
            write: true,
        });
    }
    let used = guest.submit(&chain);
    assert_eq!(used as usize, reply_len);
    let mut reply = Vec::new();
    for (addr, len) in addrs {
        let mut part = vec![0u8; len];
        guest.mem.read_slice(&mut part, GuestAddress(addr)).unwrap();
        reply.extend_from_slice(&part);
    }
    let out = OutHeader::from_slice(&reply[..std::mem::size_of::<OutHeader>()])
        .copied()
        .unwrap();
    assert_eq!((out.error, out.unique), (0, guest.unique));
    let split = InitOut::from_slice(&reply[std::mem::size_of::<OutHeader>()..])
        .copied()
        .unwrap();
    assert_eq!(split.as_slice(), whole.as_slice());
}

#[test]
fn the_init_reply_the_guest_reads_is_what_the_server_serves() {
    // Whatever the guest offers, the request sizes in the reply agree with each other and
    // with the server's buffers, and a WRITE as large as the reply's `max_write` is served
    // in full: the guest and the server negotiated the same thing.
    let big_writes = FsOptions::BIG_WRITES.bits() as u32;
    let max_pages = FsOptions::MAX_PAGES.bits() as u32;
    let server_buffer = fuse_backend_rs::api::server::MAX_BUFFER_SIZE;
    for offered in [0, big_writes, max_pages, big_writes | max_pages] {
        let dir = tempfile::tempdir().unwrap();
        let mut guest = Guest::new(dir.path());
        let init = guest.init_offering(offered);
        assert_eq!(init.flags & !offered & (big_writes | max_pages), 0);
        if offered == 0 {
            assert_eq!(init.max_write, 4096, "offered {offered:#x}");
        } else {
            assert_eq!(init.max_write, server_buffer, "offered {offered:#x}");
            assert_eq!(init.flags & offered, offered);
        }
        if init.flags & max_pages != 0 {
            assert_eq!(
                u32::from(init.max_pages) * 4096,
                init.max_write,
                "offered {offered:#x}"
            );
        }
        let (inode, fh) = guest.create(ROOT_ID, "big");
        let data = vec![0x5au8; init.max_write as usize];
        assert_eq!(guest.write(inode, fh, &data), Ok(init.max_write));
        let written = std::fs::read(dir.path().join("big")).unwrap();
        assert_eq!(written.len(), data.len(), "offered {offered:#x}");
    }
}

#[test]
fn lookup_of_a_shared_file_returns_its_attributes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello, guest\n").unwrap();
    let mut guest = Guest::new(dir.path());
    guest.init();

    let entry = guest
        .lookup(ROOT_ID, "hello.txt")
        .expect("the file is found");
    assert_eq!(entry.attr.size, 13);
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_ne!(entry.nodeid, ROOT_ID);

    assert_eq!(guest.lookup(ROOT_ID, "missing").err(), Some(-libc::ENOENT));
}

#[test]
fn under_auto_a_file_unchanged_since_its_last_open_keeps_its_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.html");
    std::fs::write(&path, b"one").unwrap();
    // Only a file whose last change is a while back is trusted to stay as it is.
    std::thread::sleep(shared_dir_fs::SETTLED + Duration::from_millis(100));
    let mut guest = Guest::new(dir.path());
    guest.init();
    let file = guest.lookup(ROOT_ID, "index.html").unwrap().nodeid;
    let keeps = |open: OpenOut| open.open_flags & FOPEN_KEEP_CACHE != 0;

    assert!(
        !keeps(guest.open(file, libc::O_RDONLY)),
        "the first open drops the cache"
    );
    assert!(
        keeps(guest.open(file, libc::O_RDONLY)),
        "unchanged: it is kept"
    );
    assert!(keeps(guest.open(file, libc::O_RDONLY)), "and kept again");
    assert!(
        !keeps(guest.open(file, libc::O_RDWR)),
        "an open that may write is as before"
    );

    // The host rewrites it, same size, and even puts its mtime back: its ctime moves, and
    // the next open drops the cache.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, b"two").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    assert!(
        !keeps(guest.open(file, libc::O_RDONLY)),
        "changed on the host"
    );
    assert!(
        !keeps(guest.open(file, libc::O_RDONLY)),
        "changed too recently to be trusted"
    );
}

#[test]
fn other_cache_modes_answer_opens_as_the_passthrough_file_system_does() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    std::thread::sleep(shared_dir_fs::SETTLED + Duration::from_millis(100));
    for (mode, kept) in [
        (FsCache::Never, false),
        (FsCache::Metadata, false),
        (FsCache::Always, true),
    ] {
        let mut guest =
            Guest::with_device(Fs::with_cache("brig", dir.path().to_path_buf(), mode).unwrap());
        guest.init();
        let file = guest.lookup(ROOT_ID, "f").unwrap().nodeid;
        for _ in 0..2 {
            let open = guest.open(file, libc::O_RDONLY);
            assert_eq!(open.open_flags & FOPEN_KEEP_CACHE != 0, kept, "{mode:?}");
        }
    }
}

#[test]
fn a_file_opened_read_only_is_closed_without_a_flush_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"x").unwrap();
    for mode in [
        FsCache::Auto,
        FsCache::Never,
        FsCache::Metadata,
        FsCache::Always,
    ] {
        let mut guest =
            Guest::with_device(Fs::with_cache("brig", dir.path().to_path_buf(), mode).unwrap());
        guest.init();
        let file = guest.lookup(ROOT_ID, "f").unwrap().nodeid;
        for (flags, no_flush) in [
            (libc::O_RDONLY, true),
            (libc::O_WRONLY, false),
            (libc::O_RDWR, false),
        ] {
            let open = guest.open(file, flags);
            assert_eq!(
                open.open_flags & FOPEN_NOFLUSH != 0,
                no_flush,
                "{mode:?}, flags {flags:#o}"
            );
        }
    }
}

#[test]
fn a_reset_opens_no_file_on_the_vcpu_and_the_next_driver_gets_a_fresh_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::fs::write(dir.path().join("etc/hostname"), b"pod\n").unwrap();
    let mut guest = Guest::new(dir.path());
    guest.init();
    let etc = guest
        .lookup(ROOT_ID, "etc")
        .expect("the directory is found");
    assert!(guest.lookup(etc.nodeid, "hostname").is_ok());

    // The driver resets the device from a vCPU thread, whose filter allows no file opening.
    let code = crate::seccomp::exit_code_under_filter(crate::seccomp::ThreadKind::Vcpu, || {
        guest.fs.reset();
        0
    });
    assert_eq!(code, Some(0), "the reset makes only calls a vCPU may make");

    // The device's own thread builds the fresh server, under its own filter.
    guest.fs.reset();
    let code = crate::seccomp::exit_code_under_filter(crate::seccomp::ThreadKind::Fs, || {
        guest.fs.process_queue(REQUEST_QUEUE);
        i32::from(guest.fs.server_stale)
    });
    assert_eq!(code, Some(0), "the virtio-fs thread may build a server");

    // The next driver starts over: the inodes of the old one are gone, the share is not.
    let mut guest = Guest::with_device(guest.fs);
    guest.init();
    assert!(
        guest.lookup(etc.nodeid, "hostname").is_err(),
        "an inode of the driver before the reset is forgotten"
    );
    let etc = guest
        .lookup(ROOT_ID, "etc")
        .expect("the share is served again");
    assert!(guest.lookup(etc.nodeid, "hostname").is_ok());
}

#[test]
fn dotdot_of_the_root_does_not_escape_the_shared_directory() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host-secret"), b"no").unwrap();
    let shared = outside.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(shared.join("sub")).unwrap();
    let mut guest = Guest::new(&shared);
    guest.init();

    let root_ino = std::fs::metadata(&shared).unwrap().ino();
    let sub = guest.lookup(ROOT_ID, "sub").unwrap();
    for (parent, name) in [
        (ROOT_ID, ".."),
        (sub.nodeid, ".."),
        (ROOT_ID, "../host-secret"),
    ] {
        match guest.lookup(parent, name) {
            Ok(entry) => {
                assert_eq!(
                    entry.attr.ino, root_ino,
                    "{name} resolves to the shared root"
                );
                assert!(
                    guest.lookup(entry.nodeid, "host-secret").is_err(),
                    "the parent's entries are not reachable through {name}"
                );
            }
            Err(e) => assert!(e < 0, "an errno, got {e}"),
        }
    }
    // Neither through the root itself.
    assert!(guest.lookup(ROOT_ID, "host-secret").is_err());
}

#[test]
fn malformed_chains_are_returned_empty_and_the_device_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut guest = Guest::new(dir.path());

    // A request shorter than a FUSE header, with a reply buffer.
    let short = guest.buffer(&[1, 2, 3, 4], 4);
    let reply = guest.buffer(&[], 256);
    let chain = [
        Desc {
            addr: short,
            len: 4,
            write: false,
        },
        Desc {
            addr: reply,
            len: 256,
            write: true,
        },
    ];
    assert_eq!(guest.submit(&chain), 0);

    // A header only, no room for a reply.
    let header = InHeader {
        len: 40,
        opcode: FUSE_INIT,
        unique: 99,
        ..InHeader::default()
    };
    let req = guest.buffer(header.as_slice(), 40);
    assert_eq!(
        guest.submit(&[Desc {
            addr: req,
            len: 40,
            write: false
        }]),
        0
    );

    // A descriptor that points past the end of guest memory.
    let past_end = MEM_SIZE as u64 - 8;
    assert_eq!(
        guest.submit(&[
            Desc {
                addr: past_end,
                len: 64,
                write: false
            },
            Desc {
                addr: reply,
                len: 256,
                write: true
            },
        ]),
        0
    );

    // A header claiming more bytes than the chain holds.
    let lying = InHeader {
        len: 4096,
        opcode: FUSE_LOOKUP,
        unique: 7,
        nodeid: ROOT_ID,
        ..InHeader::default()
    };
    let req = guest.buffer(lying.as_slice(), 40);
    let used = guest.submit(&[
        Desc {
            addr: req,
            len: 40,
            write: false,
        },
        Desc {
            addr: reply,
            len: 256,
            write: true,
        },
    ]);
    assert!(used as usize <= 256);

    // Only writable descriptors.
    assert_eq!(
        guest.submit(&[Desc {
            addr: reply,
            len: 256,
            write: true
        }]),
        0
    );

    // The device still answers a well-formed request.
    assert_eq!(guest.init().major, 7);
}

#[test]
fn config_space_holds_the_tag_and_one_request_queue() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new("rootfs", dir.path().to_path_buf()).unwrap();
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), &[1024, 1024]);
    assert_eq!(
        fs.avail_features(),
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    );

    let config = fs.config_space();
    assert_eq!(config.len(), 40);
    assert_eq!(&config[..6], b"rootfs");
    assert!(
        config[6..36].iter().all(|&b| b == 0),
        "the tag is NUL padded"
    );
    assert_eq!(&config[36..40], &1u32.to_le_bytes());
}

#[test]
fn new_rejects_bad_tags_and_missing_directories() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let ok_dir = dir.path().to_path_buf();

    assert!(matches!(
        Fs::new("", ok_dir.clone()),
        Err(FsError::EmptyTag)
    ));
    assert!(matches!(
        Fs::new(&"t".repeat(37), ok_dir.clone()),
        Err(FsError::TagTooLong(37))
    ));
    assert!(
        Fs::new(&"t".repeat(36), ok_dir.clone()).is_ok(),
        "36 bytes fill the field"
    );
    assert!(matches!(
        Fs::new("a\0b", ok_dir),
        Err(FsError::TagContainsNul)
    ));
    assert!(matches!(
        Fs::new("brig", dir.path().join("missing")),
        Err(FsError::DirMissing { .. })
    ));
    assert!(matches!(
        Fs::new("brig", file),
        Err(FsError::NotADirectory(_))
    ));
}

#[test]
fn symlinks_in_the_share_are_not_followed_on_the_host() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host-secret"), b"no").unwrap();
    let shared = outside.path().join("share");
    std::fs::create_dir(&shared).unwrap();
    // Links a guest (or a container image) could plant, pointing out of the share.
    std::os::unix::fs::symlink(outside.path(), shared.join("abs")).unwrap();
    std::os::unix::fs::symlink("..", shared.join("rel")).unwrap();
    std::os::unix::fs::symlink("../host-secret", shared.join("file")).unwrap();
    let mut guest = Guest::new(&shared);
    guest.init();

    for name in ["abs", "rel", "file"] {
        let entry = guest.lookup(ROOT_ID, name).unwrap();
        // The server hands out the link itself (the guest kernel resolves it inside the
        // guest), never what it points to on the host.
        assert_eq!(
            entry.attr.mode & libc::S_IFMT,
            libc::S_IFLNK,
            "{name} is seen as a symlink"
        );
        assert_eq!(
            entry.attr.size,
            std::fs::symlink_metadata(shared.join(name)).unwrap().len()
        );
        assert!(
            guest.lookup(entry.nodeid, "host-secret").is_err(),
            "looking up through the link {name} must not reach the host directory"
        );
    }
}

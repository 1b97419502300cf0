//! The image store under one directory (`/var/lib/brig` by default):
//!
//! ```text
//! images.json          the images: name, manifest digest, layers, config defaults
//! layers/<hex>/        each layer unpacked once, named by its (compressed) blob digest
//! locks/<name>         flock files: one per layer (a pull that finds the lock taken waits
//!                      and then finds the layer there) and one for images.json
//! tmp/                 downloads and unpacks in progress, renamed into place when whole
//! ```
//!
//! Nothing reaches `layers/` before its digests checked out: the blob's against the manifest,
//! the unpacked tar's against the config's `rootfs.diff_ids`. A failed pull leaves the store
//! as it was.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::unpack::{unpack, UnpackError};

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("image {0} is not in the store (`brig images` lists what is)")]
    NotFound(String),
    #[error("the image store's {path} is damaged ({reason}): remove it and pull again")]
    Damaged { path: PathBuf, reason: String },
    #[error("{what} {digest} does not match its content ({actual}): the download or the image is corrupt, and nothing of it was kept")]
    DigestMismatch {
        what: &'static str,
        digest: String,
        actual: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("layer {digest}: {cause}")]
    Unpack { digest: String, cause: UnpackError },
    #[error("image {name} is used by container {container}: remove the container first (brig rm {container})")]
    InUse { name: String, container: String },
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        cause: source,
    }
}

/// What an image's config asks of a container made from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// `PORT/PROTO` as the config lists them.
    pub exposed_ports: Vec<String>,
}

/// One image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// What it was pulled as (see [`crate::Source::name`]).
    pub name: String,
    /// Digest of its manifest.
    pub digest: String,
    /// Blob digests of its layers, bottom first.
    pub layers: Vec<String>,
    /// Bytes of its layer blobs.
    pub size: u64,
    /// Seconds since the epoch when it was pulled.
    pub pulled: u64,
    pub defaults: ImageDefaults,
}

impl ImageRecord {
    /// A short ID, as `docker images` shows: the first 12 hex digits of the manifest digest.
    pub fn short_id(&self) -> &str {
        let hex = self.digest.strip_prefix("sha256:").unwrap_or(&self.digest);
        &hex[..hex.len().min(12)]
    }
}

/// The image store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// The hex part of a `sha256:` digest, checked (it becomes a file name).
pub fn sha256_hex(digest: &str) -> Result<&str, StoreError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
        StoreError::Invalid(format!(
            "digest {digest:?} is not sha256: only sha256 digests are supported"
        ))
    })?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(StoreError::Invalid(format!(
            "digest {digest:?} is malformed"
        )));
    }
    Ok(hex)
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Compression of a layer blob, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From an OCI or Docker layer media type.
    pub fn of_media_type(media_type: &str) -> Result<Self, StoreError> {
        if media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip") {
            Ok(Self::Gzip)
        } else if media_type.ends_with("+zstd") {
            Ok(Self::Zstd)
        } else if media_type.ends_with(".tar") || media_type.ends_with("layer.v1.tar") {
            Ok(Self::None)
        } else {
            Err(StoreError::Invalid(format!(
                "layer media type {media_type:?} is not supported (tar, tar+gzip or tar+zstd)"
            )))
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }
    fn digest(&self) -> String {
        format!("sha256:{:x}", self.hasher.clone().finalize())
    }
}

impl Store {
    /// The store at `root`, made if missing.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for sub in ["layers", "locks", "tmp", "containers"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a layer lives once unpacked.
    pub fn layer_dir(&self, digest: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root.join("layers").join(sha256_hex(digest)?))
    }

    /// A directory for a container's writable layer (overlay upper and work dirs).
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    /// A scratch path under `tmp/`, unique to this process and `what`.
    pub(crate) fn tmp_path(&self, what: &str) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{what}.{}", std::process::id()))
    }

    /// Take the flock `locks/<name>` (shared or exclusive), waiting for it.
    pub(crate) fn lock(&self, name: &str, exclusive: bool) -> Result<Flock<File>, StoreError> {
        let path = self.root.join("locks").join(name);
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("opening the lock", &path))?;
        let arg = if exclusive {
            FlockArg::LockExclusive
        } else {
            FlockArg::LockShared
        };
        Flock::lock(file, arg).map_err(|(_, e)| StoreError::Io {
            action: "locking",
            path,
            cause: e.into(),
        })
    }

    /// Every image, in pull order. The caller holds the images lock.
    fn read_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let path = self.root.join("images.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Damaged {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    fn write_images(&self, images: &[ImageRecord]) -> Result<(), StoreError> {
        let path = self.root.join("images.json");
        let tmp = self.tmp_path("images.json");
        let bytes =
            serde_json::to_vec_pretty(images).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut file = File::create(&tmp).map_err(io_err("writing", &tmp))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_err("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err("writing", &path))
    }

    /// Keep every layer in the store while the returned lock is held: pulls hold it until
    /// their image is recorded, `brig run` until its container's record names its image,
    /// and [`Store::remove`] waits for them before it removes unused layers (which would
    /// otherwise take a layer an image being pulled or mounted is about to name).
    pub fn hold(&self) -> Result<Flock<File>, StoreError> {
        self.lock("gc", false)
    }

    /// Every image in the store.
    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let _lock = self.lock("images", false)?;
        self.read_images()
    }

    /// The image named `name` (as [`crate::Source::name`] gives it), or whose manifest digest
    /// starts with `name` (12 hex digits at least, as `brig images` shows them).
    pub fn find(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        Ok(find_in(&self.images()?, name).cloned())
    }

    /// Add or replace (by name) an image record.
    pub(crate) fn record(&self, image: ImageRecord) -> Result<(), StoreError> {
        let _lock = self.lock("images", true)?;
        let mut images = self.read_images()?;
        images.retain(|i| i.name != image.name);
        images.push(image);
        self.write_images(&images)
    }

    /// Remove the image `name` unless `in_use` names a container that uses it, then every
    /// layer no remaining image uses.
    pub fn remove(
        &self,
        name: &str,
        in_use: impl Fn(&ImageRecord) -> Option<String>,
    ) -> Result<ImageRecord, StoreError> {
        // In this order (pulls take "gc", then a layer's lock or "images"): no deadlock.
        let _no_holders = self.lock("gc", true)?;
        let _lock = self.lock("images", true)?;
        let mut images = self.read_images()?;
        let image = find_in(&images, name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        if let Some(container) = in_use(&image) {
            return Err(StoreError::InUse {
                name: image.name,
                container,
            });
        }
        images.retain(|i| i.name != image.name);
        self.write_images(&images)?;
        for layer in &image.layers {
            if images.iter().any(|i| i.layers.contains(layer)) {
                continue;
            }
            let dir = self.layer_dir(layer)?;
            let _layer_lock = self.lock(sha256_hex(layer)?, true)?;
            // Renamed first, so a half-removed layer is never taken for a whole one.
            let doomed = self.tmp_path(&format!("removing-{}", sha256_hex(layer)?));
            if std::fs::rename(&dir, &doomed).is_ok() {
                std::fs::remove_dir_all(&doomed).map_err(io_err("removing", &doomed))?;
            }
        }
        Ok(image)
    }

    /// Unpack the layer blob `blob` (`media_type`, digest `digest`) into `layers/`, checking
    /// the blob's digest and the unpacked tar's against `diff_id`. Waits for, then reuses, an
    /// unpack of the same layer by another process. Returns whether it was there already.
    pub fn add_layer(
        &self,
        blob: impl Read,
        digest: &str,
        media_type: &str,
        diff_id: &str,
    ) -> Result<bool, StoreError> {
        let hex = sha256_hex(digest)?;
        let _lock = self.lock(hex, true)?;
        let dest = self.layer_dir(digest)?;
        if dest.is_dir() {
            return Ok(true);
        }
        let compression = Compression::of_media_type(media_type)?;
        let tmp = self.tmp_path(&format!("layer-{hex}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        let result = unpack_checked(blob, compression, digest, diff_id, &tmp);
        match result {
            Ok(()) => {
                std::fs::rename(&tmp, &dest).map_err(io_err("moving the layer to", &dest))?;
                Ok(false)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// A layer is there already.
    pub fn has_layer(&self, digest: &str) -> bool {
        self.layer_dir(digest).map(|d| d.is_dir()).unwrap_or(false)
    }

    /// The unpacked layers of `image`, top first, as overlayfs's `lowerdir` lists them.
    pub fn lower_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>, StoreError> {
        image
            .layers
            .iter()
            .rev()
            .map(|l| {
                let dir = self.layer_dir(l)?;
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(StoreError::Damaged {
                        path: dir,
                        reason: format!("layer {l} of {} is missing", image.name),
                    })
                }
            })
            .collect()
    }
}

fn find_in<'a>(images: &'a [ImageRecord], name: &str) -> Option<&'a ImageRecord> {
    images.iter().rev().find(|i| i.name == name).or_else(|| {
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        (hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| {
                images.iter().rev().find(|i| {
                    i.digest
                        .strip_prefix("sha256:")
                        .is_some_and(|d| d.starts_with(hex))
                })
            })
            .flatten()
    })
}

/// Decompress and unpack `blob` into `dest`, then check both digests; the caller removes
/// `dest` on error.
fn unpack_checked(
    blob: impl Read,
    compression: Compression,
    digest: &str,
    diff_id: &str,
    dest: &Path,
) -> Result<(), StoreError> {
    let mut compressed = Hashing::new(blob);
    let unpacked = {
        let stream: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(&mut compressed),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(&mut compressed)),
            Compression::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new(&mut compressed).map_err(|e| {
                    StoreError::Unpack {
                        digest: digest.to_string(),
                        cause: UnpackError::Tar(std::io::Error::other(e.to_string())),
                    }
                })?,
            ),
        };
        let mut tar = Hashing::new(stream);
        let unpacked = unpack(&mut tar, dest);
        // The tar may end before its stream does (padding): the digests cover every byte.
        let drained = std::io::copy(&mut tar, &mut std::io::sink());
        unpacked.map_err(|source| StoreError::Unpack {
            digest: digest.to_string(),
            cause: source,
        })?;
        drained.map_err(|e| StoreError::Unpack {
            digest: digest.to_string(),
            cause: UnpackError::Tar(e),
        })?;
        tar.digest()
    };
    std::io::copy(&mut compressed, &mut std::io::sink()).map_err(|e| StoreError::Unpack {
        digest: digest.to_string(),
        cause: UnpackError::Tar(e),
    })?;
    let actual = compressed.digest();
    if actual != digest {
        return Err(StoreError::DigestMismatch {
            what: "layer",
            digest: digest.to_string(),
            actual,
        });
    }
    if unpacked != diff_id {
        return Err(StoreError::DigestMismatch {
            what: "uncompressed layer (diff_id)",
            digest: diff_id.to_string(),
            actual: unpacked,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_tar(file: &str, content: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, file, content.as_bytes())
            .unwrap();
        builder.into_inner().unwrap()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    #[test]
    fn a_layer_is_unpacked_once_and_only_when_both_digests_match() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tar = layer_tar("hello.txt", "hi\n");
        let blob = gzip(&tar);
        let (digest, diff_id) = (digest_of(&blob), digest_of(&tar));

        let mut tampered = blob.clone();
        let last = tampered.len() - 9;
        tampered[last] ^= 0xff; // the gzip trailer's CRC: the tar still reads
        let err = store
            .add_layer(&tampered[..], &digest, GZ, &diff_id)
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::DigestMismatch { .. } | StoreError::Unpack { .. }
            ),
            "{err}"
        );
        assert!(!store.has_layer(&digest));
        let err = store
            .add_layer(&blob[..], &digest, GZ, &digest_of(b"other"))
            .unwrap_err();
        assert!(err.to_string().contains("diff_id"), "{err}");
        assert!(!store.has_layer(&digest));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        assert!(!store.add_layer(&blob[..], &digest, GZ, &diff_id).unwrap());
        assert!(
            store.add_layer(&[][..], &digest, GZ, &diff_id).unwrap(),
            "second time: reused"
        );
        let layer = store.layer_dir(&digest).unwrap();
        assert_eq!(
            std::fs::read_to_string(layer.join("hello.txt")).unwrap(),
            "hi\n"
        );
    }

    #[test]
    fn images_are_found_by_name_or_digest_and_removed_with_their_unshared_layers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut layers = Vec::new();
        for (name, content) in [("a", "1"), ("b", "2"), ("c", "3")] {
            let tar = layer_tar(name, content);
            let digest = digest_of(&tar);
            store
                .add_layer(
                    &tar[..],
                    &digest,
                    "application/vnd.oci.image.layer.v1.tar",
                    &digest,
                )
                .unwrap();
            layers.push(digest);
        }
        let image = |name: &str, digest: &str, layers: Vec<String>| ImageRecord {
            name: name.into(),
            digest: digest.into(),
            layers,
            size: 1,
            pulled: 0,
            defaults: ImageDefaults::default(),
        };
        let one = image(
            "r/one:1",
            &digest_of(b"one"),
            vec![layers[0].clone(), layers[1].clone()],
        );
        let two = image(
            "r/two:1",
            &digest_of(b"two"),
            vec![layers[0].clone(), layers[2].clone()],
        );
        store.record(one.clone()).unwrap();
        store.record(two.clone()).unwrap();
        assert_eq!(store.find("r/one:1").unwrap(), Some(one.clone()));
        assert_eq!(store.find(one.short_id()).unwrap(), Some(one.clone()));
        assert_eq!(store.find("r/none:1").unwrap(), None);
        assert_eq!(
            store.lower_dirs(&one).unwrap(),
            vec![
                store.layer_dir(&layers[1]).unwrap(),
                store.layer_dir(&layers[0]).unwrap()
            ]
        );

        let err = store.remove("r/one:1", |_| Some("web".into())).unwrap_err();
        assert!(err.to_string().contains("brig rm web"), "{err}");
        store.remove("r/one:1", |_| None).unwrap();
        assert!(!store.has_layer(&layers[1]), "only one used it");
        assert!(store.has_layer(&layers[0]), "two still uses it");
        assert_eq!(store.images().unwrap(), vec![two]);
        assert!(matches!(
            store.remove("r/one:1", |_| None),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn removal_waits_for_pulls_and_runs_that_hold_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tar = layer_tar("a", "1");
        let digest = digest_of(&tar);
        let plain = "application/vnd.oci.image.layer.v1.tar";
        store.add_layer(&tar[..], &digest, plain, &digest).unwrap();
        store
            .record(ImageRecord {
                name: "r/one:1".into(),
                digest: digest_of(b"one"),
                layers: vec![digest.clone()],
                size: 1,
                pulled: 0,
                defaults: ImageDefaults::default(),
            })
            .unwrap();
        // A pull of another image that shares the layer, not recorded yet, holds the store.
        let hold = store.hold().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let remover = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.remove("r/one:1", |_| None).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "removed while held"
        );
        assert!(store.has_layer(&digest));
        drop(hold);
        remover.join().unwrap();
        assert!(!store.has_layer(&digest));
    }

    #[test]
    fn digests_are_checked_before_they_name_files() {
        assert!(sha256_hex(&format!("sha256:{}", "0".repeat(64))).is_ok());
        for bad in [
            "sha512:00",
            "sha256:../../etc",
            &format!("sha256:{}", "G".repeat(64)),
        ] {
            assert!(sha256_hex(bad).is_err(), "{bad}");
        }
    }
}

//! Pull an image into the store: from a registry (with the crates.io `oci-client`), from an
//! OCI image layout directory, or from a tar archive of one. Blobs stream to disk, are checked
//! against their digests, and only then reach `layers/`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::{Client, Reference};
use serde::Deserialize;

use crate::source::Source;
use crate::store::{digest_of, io_err, sha256_hex, ImageDefaults, ImageRecord, Store, StoreError};

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP (brig.toml's
    /// `insecure_registries`, or every one with `--tls-verify=false`).
    pub insecure_registries: Vec<String>,
    /// `--tls-verify=false`: plain HTTP for the image's registry.
    pub tls_verify: bool,
}

/// What a pull reports as it goes (the CLI draws progress bars from these).
#[derive(Debug, Clone)]
pub enum PullEvent {
    /// A layer's download starts; `size` is its blob size.
    Layer { digest: String, size: u64 },
    /// Bytes of a layer arrived.
    Bytes { digest: String, bytes: u64 },
    /// The layer is unpacked (or was there already: `cached`).
    Done { digest: String, cached: bool },
}

/// A listener for [`PullEvent`]s.
pub type Progress = Arc<dyn Fn(PullEvent) + Send + Sync>;

/// The image config fields a container needs.
#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ConfigSection>,
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ConfigSection {
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// An image manifest or index, as much of it as a pull reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

/// The manifest, config and layers of an image about to be pulled.
struct Resolved {
    manifest_digest: String,
    config: ConfigFile,
    layers: Vec<Descriptor>,
}

impl ConfigFile {
    fn parse(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Invalid(format!("the image config is not valid: {e}")))
    }

    fn defaults(&self) -> ImageDefaults {
        let c = self.config.as_ref();
        let list = |f: fn(&ConfigSection) -> &Option<Vec<String>>| {
            c.and_then(|c| f(c).clone()).unwrap_or_default()
        };
        ImageDefaults {
            entrypoint: list(|c| &c.entrypoint),
            cmd: list(|c| &c.cmd),
            env: list(|c| &c.env),
            working_dir: c
                .and_then(|c| c.working_dir.clone())
                .filter(|w| !w.is_empty()),
            user: c.and_then(|c| c.user.clone()).filter(|u| !u.is_empty()),
            exposed_ports: c
                .and_then(|c| c.exposed_ports.as_ref())
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default(),
        }
    }
}

/// This host's platform in OCI's words.
fn host_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    ("linux", arch)
}

impl Store {
    /// Pull `source` into the store and record it; layers already here are not fetched again.
    pub async fn pull(
        &self,
        source: &Source,
        options: &PullOptions,
        progress: Progress,
    ) -> Result<ImageRecord, StoreError> {
        let _hold = self.hold()?;
        let name = source.name();
        let (resolved, size) = match source {
            Source::Registry(reference) => {
                self.pull_from_registry(reference, options, &progress)
                    .await?
            }
            Source::Layout { dir, tag } => {
                let store = self.clone();
                let (dir, tag, progress) = (dir.clone(), tag.clone(), progress.clone());
                blocking(move || store.pull_from_layout(&dir, tag.as_deref(), &progress)).await?
            }
            Source::Archive { file, tag } => {
                let store = self.clone();
                let (file, tag, progress) = (file.clone(), tag.clone(), progress.clone());
                blocking(move || store.pull_from_archive(&file, tag.as_deref(), &progress)).await?
            }
        };
        let record = ImageRecord {
            name,
            digest: resolved.manifest_digest,
            layers: resolved.layers.iter().map(|l| l.digest.clone()).collect(),
            size,
            pulled: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            defaults: resolved.config.defaults(),
        };
        self.record(record.clone())?;
        Ok(record)
    }

    async fn pull_from_registry(
        &self,
        reference: &Reference,
        options: &PullOptions,
        progress: &Progress,
    ) -> Result<(Resolved, u64), StoreError> {
        // reqwest's rustls needs a process-wide crypto provider; a second install is a no-op.
        // ring rather than aws-lc-rs: it builds quickly and statically for musl, and a pull
        // does not need post-quantum key exchange (the reason rustls deprecates it).
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
        let registry = reference.resolve_registry().to_string();
        let mut insecure = options.insecure_registries.clone();
        if !options.tls_verify {
            insecure.push(registry.clone());
        }
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        });
        let auth = crate::auth::credentials(&registry);
        let remote = |e: oci_client::errors::OciDistributionError| {
            let hint = match e {
                oci_client::errors::OciDistributionError::UnauthorizedError { .. } => {
                    " (the registry wants credentials: Brig reads them from $REGISTRY_AUTH_FILE or ~/.docker/config.json)"
                }
                _ => "",
            };
            StoreError::Invalid(format!(
                "pulling {}: {}{hint}",
                reference.whole(),
                one_line(&e)
            ))
        };
        let (manifest, manifest_digest, config) = client
            .pull_manifest_and_config(reference, &auth)
            .await
            .map_err(remote)?;
        let config_bytes = config.into_bytes();
        check_digest("image config", &manifest.config.digest, &config_bytes)?;
        let config = ConfigFile::parse(&config_bytes)?;
        let layers: Vec<Descriptor> = manifest
            .layers
            .iter()
            .map(|l| Descriptor {
                media_type: l.media_type.clone(),
                digest: l.digest.clone(),
                size: u64::try_from(l.size).unwrap_or(0),
                annotations: BTreeMap::new(),
                platform: None,
            })
            .collect();
        check_layers(&config, &layers)?;
        let mut size = 0;
        for (layer, diff_id) in layers.iter().zip(&config.rootfs.diff_ids) {
            size += layer.size;
            if self.has_layer(&layer.digest) {
                progress(PullEvent::Done {
                    digest: layer.digest.clone(),
                    cached: true,
                });
                continue;
            }
            progress(PullEvent::Layer {
                digest: layer.digest.clone(),
                size: layer.size,
            });
            let hex = sha256_hex(&layer.digest)?.to_string();
            let blob_path = self.tmp_path(&format!("blob-{hex}"));
            let download = self
                .download(&client, reference, layer, &blob_path, progress)
                .await;
            let unpacked = match download {
                Ok(()) => {
                    let store = self.clone();
                    let (path, layer, diff_id) =
                        (blob_path.clone(), layer.clone(), diff_id.clone());
                    blocking(move || {
                        let file = std::fs::File::open(&path).map_err(io_err("reading", &path))?;
                        store.add_layer(
                            std::io::BufReader::new(file),
                            &layer.digest,
                            &layer.media_type,
                            &diff_id,
                        )
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            let _ = std::fs::remove_file(&blob_path);
            let cached = unpacked?;
            progress(PullEvent::Done {
                digest: layer.digest.clone(),
                cached,
            });
        }
        Ok((
            Resolved {
                manifest_digest,
                config,
                layers,
            },
            size,
        ))
    }

    /// Stream one blob into `path`; never more bytes than its descriptor says.
    async fn download(
        &self,
        client: &Client,
        reference: &Reference,
        layer: &Descriptor,
        path: &Path,
        progress: &Progress,
    ) -> Result<(), StoreError> {
        let io = |action| io_err(action, path);
        let descriptor = OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: i64::try_from(layer.size).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let mut stream = client
            .pull_blob_stream(reference, &descriptor)
            .await
            .map_err(|e| {
                StoreError::Invalid(format!(
                    "pulling layer {} of {}: {}",
                    layer.digest,
                    reference.whole(),
                    one_line(&e)
                ))
            })?;
        let mut file = std::fs::File::create(path).map_err(io("writing"))?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                StoreError::Invalid(format!(
                    "downloading layer {}: {}",
                    layer.digest,
                    one_line(&e)
                ))
            })?;
            written += chunk.len() as u64;
            if written > layer.size {
                return Err(StoreError::Invalid(format!(
                    "layer {} is larger than the {} bytes its manifest says",
                    layer.digest, layer.size
                )));
            }
            file.write_all(&chunk).map_err(io("writing"))?;
            progress(PullEvent::Bytes {
                digest: layer.digest.clone(),
                bytes: chunk.len() as u64,
            });
        }
        file.sync_all().map_err(io("writing"))
    }

    fn pull_from_layout(
        &self,
        dir: &Path,
        tag: Option<&str>,
        progress: &Progress,
    ) -> Result<(Resolved, u64), StoreError> {
        let read_blob = |d: &Descriptor, limit: u64| -> Result<Vec<u8>, StoreError> {
            let path = blob_path(dir, &d.digest)?;
            let bytes = read_limited(&path, limit)?;
            check_digest("blob", &d.digest, &bytes)?;
            Ok(bytes)
        };
        let index_path = dir.join("index.json");
        let index: Manifest = serde_json::from_slice(&read_limited(&index_path, 4 << 20)?)
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", index_path.display())))?;
        let tagged: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|m| {
                tag.is_none_or(|t| {
                    m.annotations
                        .get("org.opencontainers.image.ref.name")
                        .map(String::as_str)
                        == Some(t)
                })
            })
            .collect();
        let mut descriptor = match (tagged.as_slice(), tag) {
            ([one], _) => (*one).clone(),
            ([], Some(t)) => {
                return Err(StoreError::NotFound(format!("{}:{t}", dir.display())));
            }
            (_, _) => {
                let tags: Vec<&str> = index
                    .manifests
                    .iter()
                    .filter_map(|m| m.annotations.get("org.opencontainers.image.ref.name"))
                    .map(String::as_str)
                    .collect();
                return Err(StoreError::Invalid(format!(
                    "{} holds {} images: name one with oci:DIR:TAG (tags: {})",
                    dir.display(),
                    index.manifests.len(),
                    tags.join(", ")
                )));
            }
        };
        // An index inside: take this host's platform.
        let mut manifest: Manifest = serde_json::from_slice(&read_blob(&descriptor, 4 << 20)?)
            .map_err(|e| StoreError::Invalid(format!("manifest {}: {e}", descriptor.digest)))?;
        if manifest.config.is_none() && !manifest.manifests.is_empty() {
            let (os, arch) = host_platform();
            descriptor = manifest
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == os && p.architecture == arch)
                })
                .cloned()
                .ok_or_else(|| {
                    StoreError::Invalid(format!("the image has no {os}/{arch} variant"))
                })?;
            manifest = serde_json::from_slice(&read_blob(&descriptor, 4 << 20)?)
                .map_err(|e| StoreError::Invalid(format!("manifest {}: {e}", descriptor.digest)))?;
        }
        let _ = manifest.media_type;
        let config_descriptor = manifest.config.clone().ok_or_else(|| {
            StoreError::Invalid(format!("manifest {} has no config", descriptor.digest))
        })?;
        let config = ConfigFile::parse(&read_blob(&config_descriptor, 4 << 20)?)?;
        check_layers(&config, &manifest.layers)?;
        let mut size = 0;
        for (layer, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
            size += layer.size;
            let path = blob_path(dir, &layer.digest)?;
            let file = std::fs::File::open(&path).map_err(io_err("reading", &path))?;
            progress(PullEvent::Layer {
                digest: layer.digest.clone(),
                size: layer.size,
            });
            let cached = self.add_layer(
                std::io::BufReader::new(file),
                &layer.digest,
                &layer.media_type,
                diff_id,
            )?;
            progress(PullEvent::Done {
                digest: layer.digest.clone(),
                cached,
            });
        }
        Ok((
            Resolved {
                manifest_digest: descriptor.digest,
                config,
                layers: manifest.layers,
            },
            size,
        ))
    }

    fn pull_from_archive(
        &self,
        file: &Path,
        tag: Option<&str>,
        progress: &Progress,
    ) -> Result<(Resolved, u64), StoreError> {
        let tmp = self.tmp_path("archive");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io_err("creating", &tmp))?;
        let result = std::fs::File::open(file)
            .map_err(io_err("reading", file))
            .and_then(|f| {
                crate::unpack::unpack(std::io::BufReader::new(f), &tmp).map_err(|source| {
                    StoreError::Unpack {
                        digest: file.display().to_string(),
                        cause: source,
                    }
                })
            })
            .and_then(|()| self.pull_from_layout(&tmp, tag, progress));
        let _ = std::fs::remove_dir_all(&tmp);
        result
    }
}

/// `blobs/sha256/<hex>` of a layout, the digest checked first.
fn blob_path(dir: &Path, digest: &str) -> Result<PathBuf, StoreError> {
    Ok(dir.join("blobs/sha256").join(sha256_hex(digest)?))
}

/// A small file (index, manifest, config), at most `limit` bytes.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, StoreError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io_err("reading", path))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("reading", path))?;
    if bytes.len() as u64 > limit {
        return Err(StoreError::Invalid(format!(
            "{} is larger than {limit} bytes",
            path.display()
        )));
    }
    Ok(bytes)
}

fn check_digest(what: &'static str, digest: &str, bytes: &[u8]) -> Result<(), StoreError> {
    sha256_hex(digest)?;
    let actual = digest_of(bytes);
    if actual != digest {
        return Err(StoreError::DigestMismatch {
            what,
            digest: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

fn check_layers(config: &ConfigFile, layers: &[Descriptor]) -> Result<(), StoreError> {
    if layers.len() != config.rootfs.diff_ids.len() {
        return Err(StoreError::Invalid(format!(
            "the manifest lists {} layers but the config {}",
            layers.len(),
            config.rootfs.diff_ids.len()
        )));
    }
    if layers.is_empty() {
        return Err(StoreError::Invalid("the image has no layers".into()));
    }
    for layer in layers {
        sha256_hex(&layer.digest)?;
    }
    for diff_id in &config.rootfs.diff_ids {
        sha256_hex(diff_id)?;
    }
    Ok(())
}

/// An error from a registry with its causes (reqwest names the URL, its sources say why,
/// e.g. "Connection refused"), on one line.
fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Invalid(format!("an unpack task failed: {e}")))?
}

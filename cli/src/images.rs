//! `brig pull`, `brig images`, `brig rmi`, and the image half of `brig run IMAGE`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use brig_image::{ImageRecord, PullEvent, PullOptions, Source, Store};
use brig_runtime::state::Layout;
use brig_runtime::RuntimeConfig;

/// `--tls-verify[=BOOL]`, as podman and skopeo spell it.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// Require HTTPS with a verified certificate; `--tls-verify=false` pulls over plain HTTP
    /// (for a registry on loopback, say). brig.toml's `insecure_registries` does the same
    /// for the registries it lists.
    #[arg(long = "tls-verify", value_name = "BOOL", default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub tls_verify: bool,
}

/// Arguments of `brig pull`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    #[command(flatten)]
    tls: TlsArgs,
    /// Print only the image ID.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// NAME[:TAG], NAME@sha256:DIGEST, docker://…, oci:DIR[:TAG] or oci-archive:FILE[:TAG].
    image: String,
}

/// Arguments of `brig images`.
#[derive(clap::Args, Debug)]
pub struct ImagesArgs {
    /// Print only image IDs.
    #[arg(short = 'q', long)]
    quiet: bool,
}

/// Arguments of `brig rmi`.
#[derive(clap::Args, Debug)]
pub struct RmiArgs {
    /// Images, by name or ID.
    #[arg(required = true)]
    images: Vec<String>,
}

/// When `brig run` pulls.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Only when the image is not in the store.
    #[default]
    Missing,
    /// Every time (layers already in the store are not downloaded again).
    Always,
    /// Never: the image must be in the store.
    Never,
}

fn store() -> anyhow::Result<(Store, Vec<String>)> {
    let (root, insecure) = RuntimeConfig::image_settings()?;
    let store = Store::open(&root).with_context(|| {
        format!(
            "opening the image store {} (set image_root in brig.toml or BRIG_IMAGE_ROOT)",
            root.display()
        )
    })?;
    Ok((store, insecure))
}

fn tokio() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting tokio")
}

/// Pull `source` into `store`, drawing progress on stderr when it is a terminal.
fn pull_into(store: &Store, source: &Source, options: &PullOptions) -> anyhow::Result<ImageRecord> {
    let progress = progress_bars();
    let rt = tokio()?;
    let record = rt.block_on(store.pull(source, options, progress))?;
    Ok(record)
}

/// One bar per layer (hidden when stderr is not a terminal, as indicatif does).
fn progress_bars() -> brig_image::Progress {
    let multi = indicatif::MultiProgress::new();
    let bars: Mutex<HashMap<String, indicatif::ProgressBar>> = Mutex::new(HashMap::new());
    let style =
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
    Arc::new(move |event| {
        let Ok(mut bars) = bars.lock() else {
            return;
        };
        let short = |d: &str| {
            d.trim_start_matches("sha256:")
                .chars()
                .take(12)
                .collect::<String>()
        };
        match event {
            PullEvent::Layer { digest, size } => {
                let bar = multi.add(indicatif::ProgressBar::new(size));
                bar.set_style(style.clone());
                bar.set_prefix(short(&digest));
                bars.insert(digest, bar);
            }
            PullEvent::Bytes { digest, bytes } => {
                if let Some(bar) = bars.get(&digest) {
                    bar.inc(bytes);
                }
            }
            PullEvent::Done { digest, cached } => {
                let bar = bars.remove(&digest).unwrap_or_else(|| {
                    let bar = multi.add(indicatif::ProgressBar::new(0));
                    bar.set_style(style.clone());
                    bar.set_prefix(short(&digest));
                    bar
                });
                bar.finish_with_message(if cached { "already here" } else { "unpacked" });
            }
        }
    })
}

fn options(tls: &TlsArgs, insecure: Vec<String>) -> PullOptions {
    PullOptions {
        insecure_registries: insecure,
        tls_verify: tls.tls_verify,
    }
}

/// `brig pull`.
pub fn pull(args: PullArgs) -> anyhow::Result<u8> {
    let source: Source = args.image.parse()?;
    let (store, insecure) = store()?;
    let record = pull_into(&store, &source, &options(&args.tls, insecure))?;
    if args.quiet {
        crate::outln!("{}", record.digest)?;
    } else {
        crate::outln!("{} {}", record.name, record.digest)?;
    }
    Ok(0)
}

/// `brig images`.
pub fn images(args: ImagesArgs) -> anyhow::Result<u8> {
    let (store, _) = store()?;
    let images = store.images()?;
    if args.quiet {
        for image in &images {
            crate::outln!("{}", image.short_id())?;
        }
        return Ok(0);
    }
    crate::outln!(
        "{:<60} {:<12} {:>7} {:>10}",
        "IMAGE",
        "ID",
        "LAYERS",
        "SIZE"
    )?;
    for image in &images {
        crate::outln!(
            "{:<60} {:<12} {:>7} {:>10}",
            image.name,
            image.short_id(),
            image.layers.len(),
            human_size(image.size)
        )?;
    }
    Ok(0)
}

/// `brig rmi`: an image a container still uses is refused.
pub fn rmi(args: RmiArgs, layout: &Layout) -> anyhow::Result<u8> {
    let (store, _) = store()?;
    for name in &args.images {
        let key = lookup_key(name);
        let removed = store.remove(&key, |image| {
            layout.container_ids().into_iter().find(|id| {
                layout
                    .load(id)
                    .is_ok_and(|c| c.image.as_deref() == Some(image.name.as_str()))
            })
        })?;
        crate::outln!("{} {}", removed.name, removed.digest)?;
    }
    Ok(0)
}

/// How the store names what a user typed: the normalized reference, or the text itself (an
/// image ID).
fn lookup_key(input: &str) -> String {
    match input.parse::<Source>() {
        Ok(source) if !looks_like_id(input) => source.name(),
        _ => input.to_string(),
    }
}

fn looks_like_id(s: &str) -> bool {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn human_size(bytes: u64) -> String {
    let mib = bytes as f64 / (1024.0 * 1024.0);
    if mib >= 1.0 {
        format!("{mib:.1} MiB")
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// An image for `brig run`: found in the store, or pulled as `policy` says.
pub(crate) struct RunImage {
    pub(crate) store: Store,
    pub(crate) record: ImageRecord,
    /// Keeps `rmi` from removing its layers until the container's record names the image.
    pub(crate) hold: nix::fcntl::Flock<std::fs::File>,
}

impl RunImage {
    pub(crate) fn resolve(input: &str, policy: PullPolicy, tls: &TlsArgs) -> anyhow::Result<Self> {
        let source: Source = input.parse()?;
        let (store, insecure) = store()?;
        let hold = store.hold()?;
        let key = lookup_key(input);
        let found = store.find(&key)?;
        let record = match (found, policy) {
            (Some(record), PullPolicy::Missing | PullPolicy::Never) => record,
            (None, PullPolicy::Never) => {
                anyhow::bail!("image {key} is not in the store and --pull=never: pull it with `brig pull {input}`")
            }
            (_, _) => pull_into(&store, &source, &options(tls, insecure))?,
        };
        Ok(Self {
            store,
            record,
            hold,
        })
    }

    /// The scratch directory of container `id`'s writable layer.
    pub(crate) fn scratch(&self, id: &str) -> PathBuf {
        self.store.container_dir(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids_are_looked_up_as_the_store_keeps_them() {
        assert_eq!(lookup_key("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(lookup_key("0123456789ab"), "0123456789ab");
        assert_eq!(lookup_key("registry:5000/a/b:1"), "registry:5000/a/b:1");
        assert_eq!(human_size(3 << 20), "3.0 MiB");
    }
}

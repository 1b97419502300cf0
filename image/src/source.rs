//! Where an image comes from, as a user writes it: `docker://REF`, `oci:DIR[:TAG]`,
//! `oci-archive:FILE[:TAG]`, or a plain reference (`busybox`, `registry:5000/app:1.2`,
//! `name@sha256:…`), which means a registry, as podman and skopeo read them.

use std::path::PathBuf;

use oci_client::Reference;

/// An image source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An image in a registry.
    Registry(Reference),
    /// An OCI image layout directory, and the tag to take (`org.opencontainers.image.ref.name`);
    /// without one, the layout must hold exactly one image.
    Layout { dir: PathBuf, tag: Option<String> },
    /// A tar archive of an OCI image layout.
    Archive { file: PathBuf, tag: Option<String> },
}

/// A reference that cannot be an image.
#[derive(Debug, thiserror::Error)]
#[error("{input:?} is not an image reference ({reason}): use NAME[:TAG], NAME@sha256:DIGEST, docker://…, oci:DIR[:TAG] or oci-archive:FILE[:TAG]")]
pub struct BadReference {
    pub input: String,
    pub reason: String,
}

impl std::str::FromStr for Source {
    type Err = BadReference;

    fn from_str(input: &str) -> Result<Self, BadReference> {
        let bad = |reason: &str| BadReference {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if input.is_empty() || input.len() > 4096 || input.chars().any(char::is_control) {
            return Err(bad("empty, too long, or with control characters"));
        }
        if let Some(rest) = input.strip_prefix("oci:") {
            let (dir, tag) = path_and_tag(rest);
            if dir.as_os_str().is_empty() {
                return Err(bad("oci: needs a directory"));
            }
            return Ok(Source::Layout { dir, tag });
        }
        if let Some(rest) = input.strip_prefix("oci-archive:") {
            let (file, tag) = path_and_tag(rest);
            if file.as_os_str().is_empty() {
                return Err(bad("oci-archive: needs a file"));
            }
            return Ok(Source::Archive { file, tag });
        }
        let name = input.strip_prefix("docker://").unwrap_or(input);
        if name.contains("://") {
            return Err(bad("unknown transport"));
        }
        name.parse::<Reference>()
            .map(Source::Registry)
            .map_err(|e| bad(&e.to_string()))
    }
}

/// `PATH[:TAG]`: a tag is what follows the last `:` when it has no `/`.
fn path_and_tag(s: &str) -> (PathBuf, Option<String>) {
    match s.rsplit_once(':') {
        Some((path, tag)) if !tag.contains('/') && !tag.is_empty() => {
            (PathBuf::from(path), Some(tag.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

impl Source {
    /// The name the store keeps the image under: the full registry reference
    /// (`docker.io/library/busybox:latest`), or the transport and absolute path.
    pub fn name(&self) -> String {
        fn absolute(p: &std::path::Path) -> String {
            std::path::absolute(p)
                .unwrap_or_else(|_| p.to_path_buf())
                .display()
                .to_string()
        }
        match self {
            Source::Registry(r) => r.whole(),
            Source::Layout { dir, tag } => format!(
                "oci:{}{}",
                absolute(dir),
                tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()
            ),
            Source::Archive { file, tag } => format!(
                "oci-archive:{}{}",
                absolute(file),
                tag.as_ref().map(|t| format!(":{t}")).unwrap_or_default()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        s.parse::<Source>().unwrap().name()
    }

    #[test]
    fn plain_names_are_docker_hub_references() {
        assert_eq!(name("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            name("docker://busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(
            name("127.0.0.1:5000/test/app:1.0"),
            "127.0.0.1:5000/test/app:1.0"
        );
        let pinned = format!("registry:5000/app@sha256:{}", "a".repeat(64));
        assert_eq!(name(&pinned), pinned);
    }

    #[test]
    fn layouts_and_archives_take_an_optional_tag() {
        assert_eq!(
            "oci:/srv/img:v1".parse::<Source>().unwrap(),
            Source::Layout {
                dir: "/srv/img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            "oci-archive:/srv/img.tar".parse::<Source>().unwrap(),
            Source::Archive {
                file: "/srv/img.tar".into(),
                tag: None
            }
        );
        assert_eq!(name("oci:/srv/img"), "oci:/srv/img");
    }

    #[test]
    fn malformed_references_say_what_is_accepted() {
        for bad in [
            "",
            "UPPER/Case",
            "a b",
            "ftp://x/y",
            "busybox@sha256:12",
            "oci:",
        ] {
            let err = bad.parse::<Source>().unwrap_err().to_string();
            assert!(err.contains("is not an image reference"), "{bad}: {err}");
        }
    }
}

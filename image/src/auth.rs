//! Registry credentials, where podman and docker keep them: `$REGISTRY_AUTH_FILE`, then
//! `~/.docker/config.json` (`{"auths": {"REGISTRY": {"auth": base64("user:password")}}}`).
//! Without an entry for the registry, pulls are anonymous (and the registry's bearer token
//! flow still works: `oci-client` follows it).

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: String,
}

fn auth_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(f) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(f));
    }
    if let Some(home) = std::env::var_os("HOME") {
        files.push(PathBuf::from(home).join(".docker/config.json"));
    }
    files
}

/// The credentials for `registry` (`host[:port]`, `docker.io` for Docker Hub).
pub fn credentials(registry: &str) -> RegistryAuth {
    for file in auth_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let Ok(parsed) = serde_json::from_str::<AuthFile>(&text) else {
            tracing::warn!("ignoring {}: it is not an auth file", file.display());
            continue;
        };
        if let Some(auth) = lookup(&parsed, registry) {
            return auth;
        }
    }
    RegistryAuth::Anonymous
}

fn lookup(file: &AuthFile, registry: &str) -> Option<RegistryAuth> {
    let hub = matches!(
        registry,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    );
    let entry = file.auths.iter().find_map(|(key, entry)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or("");
        let same = host == registry || (hub && host == "index.docker.io");
        same.then_some(entry)
    })?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(entry.auth.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(RegistryAuth::Basic(user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_found_by_host_and_docker_hub_by_its_old_key() {
        let file: AuthFile = serde_json::from_str(
            r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
                          "registry.local:5000": {"auth": "YWxpY2U6czNjcjN0"}}}"#,
        )
        .unwrap();
        assert!(
            matches!(lookup(&file, "docker.io"), Some(RegistryAuth::Basic(u, p)) if u == "user" && p == "pass")
        );
        assert!(
            matches!(lookup(&file, "registry.local:5000"), Some(RegistryAuth::Basic(u, p)) if u == "alice" && p == "s3cr3t")
        );
        assert!(lookup(&file, "quay.io").is_none());
    }
}

//! OCI runtime specs: the default one for a plain root filesystem, and the adjustments a
//! user asks for on the command line (`brig run -e … -w … -u … --memory …`).

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    HooksBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources,
    LinuxSeccomp, Process, Spec, UserBuilder,
};

/// Errors building a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// config.json is missing or invalid.
    #[error("invalid bundle config {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    /// A user-supplied value is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// A root filesystem or a bundle, resolved.
#[derive(Debug, Clone)]
pub struct Target {
    /// The spec (from config.json, or the default one).
    pub spec: Spec,
    /// The root filesystem directory on the host.
    pub rootfs: PathBuf,
    /// Whether the target was a bundle (then its process is the default command).
    pub bundle: bool,
}

/// Resolve `path`: an OCI bundle (a directory with config.json) or a root filesystem
/// directory.
pub fn load_target(path: &Path) -> Result<Target, SpecError> {
    if !path.is_dir() {
        return Err(SpecError::Invalid(format!(
            "rootfs or bundle {} does not exist or is not a directory",
            path.display()
        )));
    }
    let config = path.join("config.json");
    if config.exists() {
        let spec = Spec::load(&config).map_err(|e| SpecError::Bundle {
            path: config.clone(),
            reason: e.to_string(),
        })?;
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        let rootfs = if root.is_absolute() {
            root
        } else {
            path.join(root)
        };
        if !rootfs.is_dir() {
            return Err(SpecError::Bundle {
                path: config,
                reason: format!("root.path {} is not a directory", rootfs.display()),
            });
        }
        if spec.process().is_none() {
            return Err(SpecError::Bundle {
                path: config,
                reason: "it has no process".into(),
            });
        }
        return Ok(Target {
            spec,
            rootfs,
            bundle: true,
        });
    }
    // A plain root filesystem runs as `docker run` would: writable root, unless --read-only,
    // and no device beyond the standard ones in its /dev (the agent always allows those).
    let mut spec = Spec::default();
    spec.set_root(Some(
        oci_spec::runtime::RootBuilder::default()
            .path(path)
            .readonly(false)
            .build()
            .map_err(|e| SpecError::Invalid(e.to_string()))?,
    ));
    let deny_all = oci_spec::runtime::LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()
        .map_err(|e| SpecError::Invalid(e.to_string()))?;
    if let Some(resources) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.resources_mut().as_mut())
    {
        resources.set_devices(Some(vec![deny_all]));
    }
    Ok(Target {
        spec,
        rootfs: path.to_path_buf(),
        bundle: false,
    })
}

/// What the user changes on top of the spec.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Command and arguments (empty = keep the spec's).
    pub args: Vec<String>,
    /// `KEY=VALUE` additions/replacements.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: Option<String>,
    /// `UID[:GID]`.
    pub user: Option<String>,
    /// Allocate a terminal.
    pub terminal: bool,
    /// Hostname.
    pub hostname: Option<String>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// CPU limit in CPUs (fractions allowed).
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids_limit: Option<i64>,
    /// A seccomp profile (OCI `linux.seccomp` JSON).
    pub seccomp: Option<LinuxSeccomp>,
    /// Mount the root filesystem read-only.
    pub read_only: bool,
}

/// Parse `UID[:GID]` (numeric, as the container's /etc/passwd is not consulted).
pub fn parse_user(s: &str) -> Result<(u32, u32), SpecError> {
    let bad = || SpecError::Invalid(format!("--user {s:?}: use a numeric UID or UID:GID"));
    match s.split_once(':') {
        Some((u, g)) => Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?)),
        None => {
            let u = s.parse().map_err(|_| bad())?;
            Ok((u, u))
        }
    }
}

/// `env` with the `KEY=VALUE` entries of `additions` added, each replacing any entry of
/// the same name.
pub fn merge_env(mut env: Vec<String>, additions: &[String]) -> Result<Vec<String>, SpecError> {
    for kv in additions {
        let Some((key, _)) = kv.split_once('=') else {
            return Err(SpecError::Invalid(format!("--env {kv:?}: use KEY=VALUE")));
        };
        if key.is_empty() {
            return Err(SpecError::Invalid(format!(
                "--env {kv:?}: the name is empty"
            )));
        }
        env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
        env.push(kv.clone());
    }
    Ok(env)
}

/// A working directory, which must be absolute.
pub fn absolute_cwd(cwd: &str) -> Result<&str, SpecError> {
    if cwd.starts_with('/') {
        Ok(cwd)
    } else {
        Err(SpecError::Invalid(format!(
            "--workdir {cwd:?} must be an absolute path"
        )))
    }
}

/// Apply `o` to `spec`.
pub fn apply(spec: &mut Spec, o: &Overrides) -> Result<(), SpecError> {
    let mut process: Process = spec.process().clone().unwrap_or_default();
    if !o.args.is_empty() {
        process.set_args(Some(o.args.clone()));
    }
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(SpecError::Invalid(
            "no command given and the spec has none".into(),
        ));
    }
    process.set_env(Some(merge_env(
        process.env().clone().unwrap_or_default(),
        &o.env,
    )?));
    if let Some(cwd) = &o.cwd {
        process.set_cwd(absolute_cwd(cwd)?.into());
    }
    if let Some(user) = &o.user {
        let (uid, gid) = parse_user(user)?;
        let user = UserBuilder::default()
            .uid(uid)
            .gid(gid)
            .build()
            .map_err(|e| SpecError::Invalid(e.to_string()))?;
        process.set_user(user);
    }
    if o.terminal {
        process.set_terminal(Some(true));
    }
    spec.set_process(Some(process));
    if o.read_only {
        if let Some(mut root) = spec.root().clone() {
            root.set_readonly(Some(true));
            spec.set_root(Some(root));
        }
    }
    if let Some(h) = &o.hostname {
        spec.set_hostname(Some(h.clone()));
    }

    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut resources: LinuxResources = linux.resources().clone().unwrap_or_default();
    if let Some(bytes) = o.memory_bytes {
        let limit =
            i64::try_from(bytes).map_err(|_| SpecError::Invalid("--memory is too large".into()))?;
        let memory = LinuxMemoryBuilder::default()
            .limit(limit)
            .swap(limit)
            .build()
            .map_err(|e| SpecError::Invalid(e.to_string()))?;
        resources.set_memory(Some(memory));
    }
    if let Some(cpus) = o.cpus {
        if !(cpus > 0.0 && cpus.is_finite()) {
            return Err(SpecError::Invalid(format!(
                "--cpus {cpus} must be more than 0"
            )));
        }
        let period: u64 = 100_000;
        // Float to integer `as` saturates; a quota past i64 means no limit anyway.
        #[allow(clippy::cast_possible_truncation)]
        let quota = (cpus * period as f64).round() as i64;
        let cpu = LinuxCpuBuilder::default()
            .period(period)
            .quota(quota)
            .build()
            .map_err(|e| SpecError::Invalid(e.to_string()))?;
        resources.set_cpu(Some(cpu));
    }
    if let Some(limit) = o.pids_limit {
        let pids = LinuxPidsBuilder::default()
            .limit(limit)
            .build()
            .map_err(|e| SpecError::Invalid(e.to_string()))?;
        resources.set_pids(Some(pids));
    }
    linux.set_resources(Some(resources));
    if let Some(seccomp) = &o.seccomp {
        linux.set_seccomp(Some(seccomp.clone()));
    }
    spec.set_linux(Some(linux));
    Ok(())
}

/// Parse a seccomp profile file (the OCI `linux.seccomp` object).
pub fn load_seccomp(path: &Path) -> Result<LinuxSeccomp, SpecError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SpecError::Invalid(format!("seccomp profile {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| SpecError::Invalid(format!("seccomp profile {}: {e}", path.display())))
}

/// Make `spec`'s hooks what the guest runs: only `startContainer`, whose paths are in the
/// container's root filesystem and which run in its namespaces, in the microVM. The others
/// run on the host (their binaries are there), so the guest never sees them. With
/// `startContainer` hooks, the bundle's host path goes along in the annotation
/// [`brig_protocols::BUNDLE_ANNOTATION`] for the state those hooks read.
pub fn guest_hooks(spec: &mut Spec, bundle: Option<&Path>) {
    let start = spec
        .hooks()
        .as_ref()
        .and_then(|h| h.start_container().clone())
        .filter(|list| !list.is_empty());
    let Some(start) = start else {
        spec.set_hooks(None);
        return;
    };
    spec.set_hooks(Some(
        HooksBuilder::default()
            .start_container(start)
            .build()
            .unwrap_or_default(),
    ));
    if let Some(bundle) = bundle {
        spec.annotations_mut()
            .get_or_insert_with(Default::default)
            .insert(
                brig_protocols::BUNDLE_ANNOTATION.to_string(),
                bundle.display().to_string(),
            );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_gets_only_start_container_hooks_and_the_bundle_they_need() {
        let mut spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","annotations":{"a":"1"},"hooks":{
                "prestart":[{"path":"/host/prestart"}],
                "createRuntime":[{"path":"/host/runtime"}],
                "createContainer":[{"path":"/host/container"}],
                "startContainer":[{"path":"/bin/in-rootfs","args":["x","1"],"timeout":3}],
                "poststart":[{"path":"/host/poststart"}],
                "poststop":[{"path":"/host/poststop"}]}}"#,
        )
        .unwrap();
        guest_hooks(&mut spec, Some(Path::new("/b/undle")));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json["hooks"],
            serde_json::json!({"startContainer":[{"path":"/bin/in-rootfs","args":["x","1"],"timeout":3}]})
        );
        assert_eq!(
            json["annotations"],
            serde_json::json!({"a":"1", brig_protocols::BUNDLE_ANNOTATION: "/b/undle"})
        );

        // Without startContainer hooks the guest gets no hooks and no extra annotation.
        let mut spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","hooks":{"createRuntime":[{"path":"/h"}],"startContainer":[]}}"#,
        )
        .unwrap();
        guest_hooks(&mut spec, Some(Path::new("/b")));
        assert!(spec.hooks().is_none());
        assert!(spec.annotations().is_none());
    }

    #[test]
    fn overrides_land_in_the_spec() {
        let mut spec = Spec::default();
        let o = Overrides {
            args: vec!["echo".into(), "hi".into()],
            env: vec!["A=1".into(), "PATH=/bin".into()],
            cwd: Some("/tmp".into()),
            user: Some("1000:100".into()),
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids_limit: Some(20),
            ..Default::default()
        };
        apply(&mut spec, &o).unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(
            p.args().as_ref().unwrap(),
            &vec!["echo".to_string(), "hi".to_string()]
        );
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"A=1".to_string()));
        assert_eq!(env.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert_eq!(p.cwd(), &PathBuf::from("/tmp"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 100));
        let r = spec.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(50_000));
        assert_eq!(r.pids().as_ref().unwrap().limit(), 20);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let mut spec = Spec::default();
        for (o, needle) in [
            (
                Overrides {
                    env: vec!["NOEQUALS".into()],
                    ..Default::default()
                },
                "--env",
            ),
            (
                Overrides {
                    cwd: Some("rel".into()),
                    ..Default::default()
                },
                "--workdir",
            ),
            (
                Overrides {
                    user: Some("bob".into()),
                    ..Default::default()
                },
                "--user",
            ),
            (
                Overrides {
                    cpus: Some(0.0),
                    ..Default::default()
                },
                "--cpus",
            ),
        ] {
            let msg = apply(&mut spec, &o).unwrap_err().to_string();
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn targets_are_checked() {
        let missing = load_target(Path::new("/nonexistent/rootfs"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/rootfs"), "{missing}");
        let dir = std::env::temp_dir().join(format!("brig-bundle-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("config.json"), b"{ not json").unwrap();
        let msg = load_target(&dir).unwrap_err().to_string();
        assert!(msg.contains("config.json"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_plain_rootfs_gets_no_devices_beyond_the_standard_ones() {
        let target = load_target(Path::new("/")).unwrap();
        assert!(!target.bundle);
        let r = target
            .spec
            .linux()
            .as_ref()
            .unwrap()
            .resources()
            .as_ref()
            .unwrap();
        let rules = r.devices().as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        assert!(
            !rules[0].allow()
                && rules[0].access().as_deref() == Some("rwm")
                && rules[0].typ().is_none()
        );
    }
}

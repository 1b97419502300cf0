//! Reading a container's OCI spec and turning it into what the container's init needs.

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

use super::hooks::HookContext;
use super::ContainerError;

/// Longest container or exec id.
const ID_MAX: usize = 64;

/// Checks a container or exec id: 1..=64 of letters, digits, '-', '_', '.' (not "." or "..").
pub fn validate_id(kind: &str, id: &str) -> Result<(), ContainerError> {
    let ok = !id.is_empty()
        && id.len() <= ID_MAX
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ContainerError::InvalidArgument(format!(
            "{kind} id {id:?} is invalid: use 1 to {ID_MAX} letters, digits, '-', '_' or '.'"
        )))
    }
}

/// Parses config.json; a bad document is the caller's mistake (INVALID_ARGUMENT).
pub fn parse_spec(json: &str) -> Result<Spec, ContainerError> {
    let spec: Spec = serde_json::from_str(json)
        .map_err(|err| ContainerError::InvalidArgument(format!("invalid OCI spec: {err}")))?;
    let process = spec.process().as_ref().ok_or_else(|| {
        ContainerError::InvalidArgument("invalid OCI spec: it has no `process`".into())
    })?;
    check_process(process)?;
    if let Some(mappings) = super::userns::from_spec(&spec)? {
        mappings.check_user(process.user())?;
    }
    super::hooks::check(&spec)?;
    // What the container's init would refuse later, refused now with the same words.
    let invalid =
        |what: &str, err: String| ContainerError::InvalidArgument(format!("{what}: {err}"));
    if let Some(linux) = spec.linux() {
        if let Some(profile) = linux.seccomp() {
            super::seccomp::compile(profile).map_err(|err| invalid("bad seccomp profile", err))?;
        }
        if let Some(devices) = linux
            .resources()
            .as_ref()
            .and_then(|r| r.devices().as_ref())
        {
            let rules = super::devices::rules(devices).map_err(ContainerError::InvalidArgument)?;
            super::devices::compile(&rules);
        }
    }
    Ok(spec)
}

/// Parses an exec's `process` object.
pub fn parse_process(json: &str) -> Result<Process, ContainerError> {
    let process: Process = serde_json::from_str(json)
        .map_err(|err| ContainerError::InvalidArgument(format!("invalid OCI process: {err}")))?;
    check_process(&process)?;
    Ok(process)
}

fn check_process(process: &Process) -> Result<(), ContainerError> {
    match process.args() {
        Some(args) if !args.is_empty() && !args[0].is_empty() => Ok(()),
        _ => Err(ContainerError::InvalidArgument(
            "invalid OCI spec: process.args is empty; give the command to run".into(),
        )),
    }
}

/// `base.join(rel)` for a path from the spec, refusing `..` so it stays under `base`.
pub fn join_under(base: &Path, rel: &Path) -> Result<PathBuf, ContainerError> {
    let mut out = base.to_path_buf();
    for component in rel.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(ContainerError::InvalidArgument(format!(
                    "path {} may not contain '..'",
                    rel.display()
                )))
            }
        }
    }
    Ok(out)
}

/// What the agent tells a container init (or exec) process, as JSON on its config pipe.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    /// Create a container or join one.
    pub mode: InitMode,
    /// The container's spec with `root.path` resolved to the guest path of the rootfs, bind
    /// sources resolved, and `process` set to the process to run.
    pub spec: Spec,
    /// Init only, when the spec has `startContainer` hooks: what their state says beyond the
    /// spec.
    #[serde(default)]
    pub hooks: Option<HookContext>,
}

/// Whether the process sets up a new container or joins a running one.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum InitMode {
    /// Set up namespaces' contents, mounts and pivot_root; the command becomes PID 1.
    Init,
    /// Join the namespaces of the container whose init has this (agent-side) pid.
    Exec {
        /// The container init's pid.
        init_pid: i32,
    },
}

/// What the init process reports on its status pipe (one JSON document per line).
#[derive(Debug, Serialize, Deserialize)]
pub enum InitReport {
    /// Set up; waiting for the start signal.
    Ready,
    /// Gave up; exits right after.
    Failed {
        /// How the host should classify it.
        code: FailureCode,
        /// For the user.
        message: String,
    },
}

/// Error classes the host tells apart (see agent.proto).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum FailureCode {
    /// The command does not exist (127).
    NotFound,
    /// The command cannot be executed (126).
    PermissionDenied,
    /// The spec asks for something impossible (125).
    InvalidArgument,
    /// Anything else.
    Internal,
}

impl From<InitReportFailure> for ContainerError {
    fn from(failure: InitReportFailure) -> Self {
        match failure.code {
            FailureCode::NotFound => ContainerError::NotFound(failure.message),
            FailureCode::PermissionDenied => ContainerError::PermissionDenied(failure.message),
            FailureCode::InvalidArgument => ContainerError::InvalidArgument(failure.message),
            FailureCode::Internal => ContainerError::Internal(failure.message),
        }
    }
}

/// A failure reported by a container's init.
#[derive(Debug)]
pub struct InitReportFailure {
    /// Class.
    pub code: FailureCode,
    /// Message.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("container", "web-1_a.b").is_ok());
        assert!(validate_id("container", "").is_err());
        assert!(validate_id("container", "..").is_err());
        assert!(validate_id("container", "a/b").is_err());
        assert!(validate_id("container", &"a".repeat(65)).is_err());
    }

    #[test]
    fn bad_specs_are_invalid_arguments() {
        let err = parse_spec("{").unwrap_err();
        assert!(matches!(err, ContainerError::InvalidArgument(_)), "{err}");
        let err = parse_spec(r#"{"ociVersion":"1.0.2"}"#).unwrap_err();
        assert!(err.to_string().contains("no `process`"), "{err}");
        let err = parse_spec(
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":[],"user":{"uid":0,"gid":0}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("args is empty"), "{err}");
    }

    #[test]
    fn a_bad_seccomp_profile_or_device_rule_is_refused_before_the_container_exists() {
        let spec = |linux: &str| {
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["sh"],"user":{{"uid":0,"gid":0}}}},"linux":{linux}}}"#
            )
        };
        let err = parse_spec(&spec(
            r#"{"seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO","args":[{"index":9,"value":1,"op":"SCMP_CMP_EQ"}]}]}}"#,
        ))
        .unwrap_err();
        assert!(matches!(err, ContainerError::InvalidArgument(_)), "{err}");
        assert!(
            err.to_string()
                .contains("bad seccomp profile: seccomp arg index 9"),
            "{err}"
        );
        let err = parse_spec(&spec(
            r#"{"resources":{"devices":[{"allow":true,"access":"rwx"}]}}"#,
        ))
        .unwrap_err();
        assert!(matches!(err, ContainerError::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("\"rwx\""), "{err}");
        // The same sections, well formed, pass.
        parse_spec(&spec(
            r#"{"seccomp":{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]},"resources":{"devices":[{"allow":false,"access":"rwm"}]}}"#,
        ))
        .unwrap();
    }

    #[test]
    fn user_namespaces_are_checked_with_the_spec() {
        let spec = |linux: &str, user: &str| {
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["sh"],"user":{user}}},
                    "linux":{linux}}}"#
            )
        };
        let mapped = r#"{"namespaces":[{"type":"user"}],
            "uidMappings":[{"containerID":0,"hostID":100000,"size":65536}],
            "gidMappings":[{"containerID":0,"hostID":100000,"size":65536}]}"#;
        assert!(parse_spec(&spec(mapped, r#"{"uid":1000,"gid":1000}"#)).is_ok());
        let err = parse_spec(&spec(mapped, r#"{"uid":70000,"gid":0}"#)).unwrap_err();
        assert!(matches!(err, ContainerError::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("uid 70000 is not mapped"), "{err}");
        let err = parse_spec(&spec(
            r#"{"namespaces":[{"type":"user"}]}"#,
            r#"{"uid":0,"gid":0}"#,
        ))
        .unwrap_err();
        assert!(matches!(err, ContainerError::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("uidMappings is empty"), "{err}");
    }

    #[test]
    fn join_under_refuses_dot_dot() {
        let base = Path::new("/r");
        assert_eq!(
            join_under(base, Path::new("/a/./b")).unwrap(),
            PathBuf::from("/r/a/b")
        );
        assert!(join_under(base, Path::new("/a/../../etc")).is_err());
    }
}

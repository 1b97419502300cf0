//! Pods: which sandbox a container belongs to, as the engines that make pods say it, and how
//! a container joins a running sandbox's microVM and namespaces.
//!
//! containerd's CRI and CRI-O mark every container of a Kubernetes pod with annotations: the
//! pod's sandbox (pause, infra) container as `sandbox`, the others as `container` with the
//! sandbox's ID. Both adapters read them here: the containerd shim to group a pod's
//! containers in one shim, the OCI runtime CLI to create a container in its sandbox's
//! microVM instead of booting one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::sandbox::{Sandbox, SandboxError};
use crate::state::{ContainerState, Layout, StateError, Status};

/// The annotations that say what a container is in its pod: (the container type's key, the
/// sandbox ID's key), containerd's CRI first, then CRI-O.
pub const POD_ANNOTATIONS: [(&str, &str); 2] = [
    (
        "io.kubernetes.cri.container-type",
        "io.kubernetes.cri.sandbox-id",
    ),
    (
        "io.kubernetes.cri-o.ContainerType",
        "io.kubernetes.cri-o.SandboxID",
    ),
];

/// The container type of a pod's sandbox container (both engines' word).
const TYPE_SANDBOX: &str = "sandbox";
/// The container type of a pod's other containers.
const TYPE_CONTAINER: &str = "container";

/// What a container is in its pod, as its annotations say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// No pod annotations: a container alone, in a microVM of its own.
    Alone,
    /// A pod's sandbox container: its microVM is the pod's, which other containers join.
    Sandbox,
    /// A container of the pod whose sandbox container is `sandbox_id`: it runs in that
    /// container's microVM.
    Member {
        /// The sandbox container's ID.
        sandbox_id: String,
        /// The annotation that named it (for errors).
        annotation: &'static str,
    },
}

impl PodRole {
    /// The role `annotations` give a container. A `container` whose sandbox ID is missing or
    /// empty names no pod, and is alone.
    pub fn of(annotations: Option<&HashMap<String, String>>) -> Self {
        let Some(annotations) = annotations else {
            return PodRole::Alone;
        };
        for (type_key, sandbox_key) in POD_ANNOTATIONS {
            match annotations.get(type_key).map(String::as_str) {
                Some(TYPE_CONTAINER) => {
                    if let Some(id) = annotations.get(sandbox_key).filter(|s| !s.is_empty()) {
                        return PodRole::Member {
                            sandbox_id: id.clone(),
                            annotation: sandbox_key,
                        };
                    }
                }
                Some(TYPE_SANDBOX) => return PodRole::Sandbox,
                _ => {}
            }
        }
        PodRole::Alone
    }

    /// Which pod (and so which shim, which microVM) container `id` belongs to: its sandbox's
    /// ID for a member, else its own.
    pub fn group<'a>(&'a self, id: &'a str) -> &'a str {
        match self {
            PodRole::Member { sandbox_id, .. } => sandbox_id,
            _ => id,
        }
    }
}

/// Errors joining a pod's sandbox or removing one.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The annotation names a container that does not exist.
    #[error("container {container} is to join sandbox {sandbox} ({annotation}), which does not exist: create and start the sandbox container {sandbox} first, or fix the annotation")]
    NoSandbox {
        /// The container being created.
        container: String,
        /// The sandbox container it names.
        sandbox: String,
        /// The annotation that names it.
        annotation: &'static str,
    },
    /// The sandbox container is not up (created, running or paused).
    #[error("container {container} is to join sandbox {sandbox} ({annotation}), which is {status}: start a sandbox container {sandbox} again (delete the old one first), or fix the annotation")]
    SandboxDown {
        /// The container being created.
        container: String,
        /// The sandbox container it names.
        sandbox: String,
        /// The annotation that names it.
        annotation: &'static str,
        /// The sandbox container's status.
        status: &'static str,
    },
    /// A sandbox container cannot go while other containers run in its microVM.
    #[error("sandbox {sandbox} still has containers: {members}; delete them first, or use --force to delete them with it")]
    HasMembers {
        /// The sandbox container.
        sandbox: String,
        /// Its members, comma-separated.
        members: String,
    },
    /// A record could not be read.
    #[error(transparent)]
    State(#[from] StateError),
    /// The sandbox's microVM could not be reached.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// A running sandbox container that another container joins.
#[derive(Debug, Clone)]
pub struct PodSandbox {
    /// The sandbox container's record.
    pub container: ContainerState,
    /// The host namespaces (IPC, UTS, PID) its own spec named by path: CRI-O pins a pod's
    /// IPC and UTS namespaces (`/var/run/ipcns/…`) and names the same paths in the sandbox's
    /// spec and its members'.
    pub namespace_paths: Vec<(LinuxNamespaceType, PathBuf)>,
}

impl PodSandbox {
    /// The sandbox container `role` names (for a [`PodRole::Member`] created as `id`), if it
    /// is up: created, running or paused. Its errors name the sandbox and the fix.
    pub fn find(layout: &Layout, id: &str, role: &PodRole) -> Result<Option<Self>, PodError> {
        let PodRole::Member {
            sandbox_id,
            annotation,
        } = role
        else {
            return Ok(None);
        };
        let container = match layout.load(sandbox_id) {
            Ok(state) => state,
            Err(StateError::NotFound { .. }) => {
                return Err(PodError::NoSandbox {
                    container: id.to_string(),
                    sandbox: sandbox_id.clone(),
                    annotation,
                })
            }
            Err(e) => return Err(e.into()),
        };
        if !matches!(
            container.status,
            Status::Created | Status::Running | Status::Paused
        ) {
            return Err(PodError::SandboxDown {
                container: id.to_string(),
                sandbox: sandbox_id.clone(),
                annotation,
                status: container.status.as_str(),
            });
        }
        let namespace_paths = container
            .bundle
            .as_ref()
            .and_then(|bundle| Spec::load(bundle.join("config.json")).ok())
            .map(|spec| shared_namespace_paths(&spec))
            .unwrap_or_default();
        Ok(Some(Self {
            container,
            namespace_paths,
        }))
    }

    /// The ID of the microVM's sandbox (the sandbox container's own, for a pod it started).
    pub fn vm_id(&self) -> &str {
        &self.container.sandbox_id
    }

    /// What a member joins of the sandbox container's namespaces: (its host PID, as the OCI
    /// `state` shows it and engines name it in `/proc/PID/ns/…`; its init's guest PID).
    pub fn join(&self) -> Option<(u32, u32)> {
        Some((self.container.owner?.pid, self.container.guest_pid?))
    }

    /// The namespaces member `spec` gets in the guest (see [`guest_namespaces`]): besides
    /// `/proc/PID/ns/…` of the sandbox container's host PID, a path its own spec named for
    /// the same kind (a pinned namespace) is its namespace too.
    pub fn guest_namespaces(&self, spec: &mut Spec) {
        let join = self.join();
        if let (Some((host_pid, _)), Some(namespaces)) = (
            join,
            spec.linux_mut()
                .as_mut()
                .and_then(|l| l.namespaces_mut().as_mut()),
        ) {
            for ns in namespaces.iter_mut() {
                let shared = ns.path().as_ref().is_some_and(|path| {
                    self.namespace_paths
                        .iter()
                        .any(|(typ, own)| *typ == ns.typ() && own == path)
                });
                if let (true, Some(name)) = (shared, shared_namespace_name(ns.typ())) {
                    ns.set_path(Some(format!("/proc/{host_pid}/ns/{name}").into()));
                }
            }
        }
        guest_namespaces(spec, join);
    }

    /// Connect to its microVM.
    pub async fn open(&self, root: &Path) -> Result<Sandbox, PodError> {
        Ok(Sandbox::open(root, self.vm_id()).await?)
    }
}

/// The containers other than `sandbox` that run in its microVM (`sandbox_vm` being that
/// microVM's ID), sorted.
pub fn members(layout: &Layout, sandbox: &str, sandbox_vm: &str) -> Vec<String> {
    layout
        .container_ids()
        .into_iter()
        .filter(|id| id != sandbox)
        .filter(|id| {
            layout
                .load(id)
                .is_ok_and(|state| state.sandbox_id == sandbox_vm)
        })
        .collect()
}

/// The namespaces a container of a pod gets in the guest, from what its spec names on the
/// host. Every container of a sandbox shares the microVM's network namespace, which is the
/// pod's network: a network namespace entry is dropped. Other entries with a path name host
/// namespaces: engines join a pod's containers to the sandbox container's at
/// `/proc/PID/ns/…`, PID being the host process that stands for it. In the guest those are
/// the namespaces of the sandbox container's init: `join` = (that host PID, the init's guest
/// PID) turns such paths into the guest's `/proc/GUEST_PID/ns/…` for IPC, UTS and PID, so the
/// containers of a pod share them as under runc. Any other path means nothing in the guest,
/// where it could even name an unrelated process: it is dropped (a new namespace).
pub fn guest_namespaces(spec: &mut Spec, join: Option<(u32, u32)>) {
    let Some(namespaces) = spec
        .linux_mut()
        .as_mut()
        .and_then(|l| l.namespaces_mut().as_mut())
    else {
        return;
    };
    namespaces.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
    for ns in namespaces.iter_mut() {
        if let Some(path) = ns.path().clone() {
            ns.set_path(join.and_then(|(host, guest)| guest_namespace(&path, host, guest)));
        }
    }
}

/// `/proc/HOST_PID/ns/NAME` as `/proc/GUEST_PID/ns/NAME` for the namespaces a pod shares;
/// `None` for any other path.
fn guest_namespace(path: &Path, host_pid: u32, guest_pid: u32) -> Option<PathBuf> {
    let name = path
        .strip_prefix(format!("/proc/{host_pid}/ns"))
        .ok()?
        .to_str()?;
    matches!(name, "ipc" | "uts" | "pid")
        .then(|| PathBuf::from(format!("/proc/{guest_pid}/ns/{name}")))
}

/// The `/proc/PID/ns/` name of a kind of namespace a pod shares.
fn shared_namespace_name(typ: LinuxNamespaceType) -> Option<&'static str> {
    match typ {
        LinuxNamespaceType::Ipc => Some("ipc"),
        LinuxNamespaceType::Uts => Some("uts"),
        LinuxNamespaceType::Pid => Some("pid"),
        _ => None,
    }
}

/// The paths `spec` names for the kinds of namespace a pod shares.
fn shared_namespace_paths(spec: &Spec) -> Vec<(LinuxNamespaceType, PathBuf)> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .map(|namespaces| {
            namespaces
                .iter()
                .filter(|ns| shared_namespace_name(ns.typ()).is_some())
                .filter_map(|ns| Some((ns.typ(), ns.path().clone()?)))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_and_crio_annotations_name_the_sandbox_a_container_joins() {
        let cri = annotations(&[
            ("io.kubernetes.cri.container-type", "container"),
            ("io.kubernetes.cri.sandbox-id", "pod1"),
        ]);
        assert_eq!(
            PodRole::of(Some(&cri)),
            PodRole::Member {
                sandbox_id: "pod1".into(),
                annotation: "io.kubernetes.cri.sandbox-id"
            }
        );
        assert_eq!(PodRole::of(Some(&cri)).group("app"), "pod1");
        let crio = annotations(&[
            ("io.kubernetes.cri-o.ContainerType", "container"),
            ("io.kubernetes.cri-o.SandboxID", "pod2"),
        ]);
        assert_eq!(
            PodRole::of(Some(&crio)),
            PodRole::Member {
                sandbox_id: "pod2".into(),
                annotation: "io.kubernetes.cri-o.SandboxID"
            }
        );
        assert_eq!(PodRole::of(Some(&crio)).group("app"), "pod2");
    }

    #[test]
    fn a_sandbox_container_or_one_without_annotations_boots_its_own_vm() {
        for kind in [
            (
                "io.kubernetes.cri.container-type",
                "io.kubernetes.cri.sandbox-id",
            ),
            (
                "io.kubernetes.cri-o.ContainerType",
                "io.kubernetes.cri-o.SandboxID",
            ),
        ] {
            let sandbox = annotations(&[(kind.0, "sandbox"), (kind.1, "pod1")]);
            assert_eq!(PodRole::of(Some(&sandbox)), PodRole::Sandbox);
            assert_eq!(PodRole::of(Some(&sandbox)).group("pod1"), "pod1");
        }
        assert_eq!(PodRole::of(None), PodRole::Alone);
        assert_eq!(PodRole::of(None).group("alone"), "alone");
        assert_eq!(
            PodRole::of(Some(&annotations(&[(
                "org.opencontainers.image.title",
                "x"
            )]))),
            PodRole::Alone
        );
    }

    #[test]
    fn a_member_without_a_sandbox_id_or_of_an_unknown_type_is_alone() {
        for pairs in [
            &[
                ("io.kubernetes.cri.container-type", "container"),
                ("io.kubernetes.cri.sandbox-id", ""),
            ][..],
            &[("io.kubernetes.cri-o.ContainerType", "container")][..],
            &[
                ("io.kubernetes.cri-o.ContainerType", "Container"),
                ("io.kubernetes.cri-o.SandboxID", "pod1"),
            ][..],
            // A sandbox ID alone does not make a member: only the type does.
            &[("io.kubernetes.cri.sandbox-id", "pod1")][..],
        ] {
            assert_eq!(
                PodRole::of(Some(&annotations(pairs))),
                PodRole::Alone,
                "{pairs:?}"
            );
        }
    }

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    fn paths(spec: &Spec) -> Vec<(LinuxNamespaceType, Option<PathBuf>)> {
        spec.linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap()
            .iter()
            .map(|ns| (ns.typ(), ns.path().clone()))
            .collect()
    }

    #[test]
    fn a_member_joins_the_sandbox_containers_ipc_uts_and_pid_in_the_guest() {
        let json = r#"{"ociVersion":"1.0.2","linux":{"namespaces":[
            {"type":"network","path":"/var/run/netns/cni-1"},
            {"type":"ipc","path":"/proc/42/ns/ipc"},
            {"type":"uts","path":"/proc/42/ns/uts"},
            {"type":"pid","path":"/proc/42/ns/pid"},
            {"type":"mount"},
            {"type":"cgroup","path":"/proc/42/ns/cgroup"},
            {"type":"user","path":"/proc/7/ns/user"}]}}"#;
        let mut joined = spec(json);
        guest_namespaces(&mut joined, Some((42, 3)));
        assert_eq!(
            paths(&joined),
            vec![
                (LinuxNamespaceType::Ipc, Some("/proc/3/ns/ipc".into())),
                (LinuxNamespaceType::Uts, Some("/proc/3/ns/uts".into())),
                (LinuxNamespaceType::Pid, Some("/proc/3/ns/pid".into())),
                (LinuxNamespaceType::Mount, None),
                (LinuxNamespaceType::Cgroup, None),
                (LinuxNamespaceType::User, None),
            ]
        );
        // Alone (or a sandbox itself): every host path is dropped, new namespaces.
        let mut alone = spec(json);
        guest_namespaces(&mut alone, None);
        assert!(paths(&alone).iter().all(|(_, p)| p.is_none()));
        assert_eq!(paths(&alone).len(), 6, "the network entry goes");
    }

    #[test]
    fn a_member_naming_the_sandboxs_pinned_namespaces_joins_them_and_no_others() {
        let sandbox_spec = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[
            {"type":"network","path":"/var/run/netns/pod"},
            {"type":"ipc","path":"/var/run/ipcns/pod"},
            {"type":"uts","path":"/var/run/utsns/pod"},
            {"type":"pid"},{"type":"mount"}]}}"#,
        );
        let mut container = ContainerState::new("pod", "pod", None);
        container.owner = Some(crate::state::ProcessRef {
            pid: 42,
            start_time: 1,
        });
        container.guest_pid = Some(3);
        let sandbox = PodSandbox {
            container,
            namespace_paths: shared_namespace_paths(&sandbox_spec),
        };
        assert_eq!(
            sandbox.namespace_paths,
            vec![
                (LinuxNamespaceType::Ipc, "/var/run/ipcns/pod".into()),
                (LinuxNamespaceType::Uts, "/var/run/utsns/pod".into()),
            ]
        );
        let mut member = spec(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[
            {"type":"network","path":"/var/run/netns/pod"},
            {"type":"ipc","path":"/var/run/ipcns/pod"},
            {"type":"uts","path":"/var/run/utsns/other"},
            {"type":"pid","path":"/proc/42/ns/pid"},
            {"type":"mount","path":"/var/run/ipcns/pod"}]}}"#,
        );
        sandbox.guest_namespaces(&mut member);
        assert_eq!(
            paths(&member),
            vec![
                (LinuxNamespaceType::Ipc, Some("/proc/3/ns/ipc".into())),
                (LinuxNamespaceType::Uts, None),
                (LinuxNamespaceType::Pid, Some("/proc/3/ns/pid".into())),
                (LinuxNamespaceType::Mount, None),
            ]
        );
    }
}

//! The pod's cgroup on the host: the shim and its microVM run in the sandbox's
//! `linux.cgroupsPath` (CRI sets it under the pod's cgroup that kubelet made), so a pod's
//! whole overhead is accounted and limited where Kubernetes expects it, as runc's pause
//! process is. cgroup v2 with cgroupfs paths (`/kubepods/…/<id>`); a systemd path
//! (`slice:prefix:name`) is left alone with a warning.

use std::path::{Component, Path, PathBuf};

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors placing the shim into the pod's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The path is not a plain absolute cgroupfs path.
    #[error("cgroupsPath {0:?} is not an absolute cgroup path without '..' components")]
    BadPath(String),
    /// Creating or joining the cgroup failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The shim's placement in a pod's cgroup, to be undone when the pod is gone.
#[derive(Debug)]
pub struct PodCgroup {
    /// The pod's cgroup directory (we made it if it did not exist).
    dir: PathBuf,
    /// The cgroup the shim came from (where it goes back before removing `dir`).
    from: PathBuf,
}

/// The cgroup directory `cgroups_path` names under `root`; `None` for a systemd path.
fn cgroup_dir(root: &Path, cgroups_path: &str) -> Result<Option<PathBuf>, CgroupError> {
    if !cgroups_path.starts_with('/') {
        if cgroups_path.split(':').count() == 3 {
            return Ok(None);
        }
        return Err(CgroupError::BadPath(cgroups_path.into()));
    }
    let mut dir = root.to_path_buf();
    for c in Path::new(cgroups_path).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(name) => dir.push(name),
            _ => return Err(CgroupError::BadPath(cgroups_path.into())),
        }
    }
    if dir == root {
        return Err(CgroupError::BadPath(cgroups_path.into()));
    }
    Ok(Some(dir))
}

/// This process's cgroup v2 directory (from `/proc/self/cgroup`, `0::/path`).
fn own_cgroup(root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(path.trim_start_matches('/')))
}

fn join(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Io {
        what: "join",
        path: procs,
        source,
    })
}

impl PodCgroup {
    /// Move this process (and so what it starts afterwards, the VMM) into `cgroups_path`.
    /// `Ok(None)` when there is nothing to do (a systemd path).
    pub fn enter(cgroups_path: &str) -> Result<Option<Self>, CgroupError> {
        Self::enter_under(Path::new(CGROUP_ROOT), cgroups_path)
    }

    fn enter_under(root: &Path, cgroups_path: &str) -> Result<Option<Self>, CgroupError> {
        let Some(dir) = cgroup_dir(root, cgroups_path)? else {
            tracing::warn!(
                cgroups_path,
                "a systemd cgroup path: the shim and the microVM stay in containerd's cgroup"
            );
            return Ok(None);
        };
        let from = own_cgroup(root).unwrap_or_else(|| root.to_path_buf());
        std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        if let Err(e) = join(&dir, std::process::id()) {
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(Some(Self { dir, from }))
    }

    /// Once the microVM is gone: go back where the shim came from and remove the pod's
    /// cgroup (kubelet removes the pod's parent cgroup only when it is empty).
    pub fn leave(self) {
        if let Err(e) = join(&self.from, std::process::id()) {
            tracing::warn!("leaving the pod's cgroup: {e}");
        }
        remove(&self.dir);
    }
}

/// Remove the pod cgroup `cgroups_path` if it exists and is empty (a dead shim's `delete`).
pub fn remove_path(cgroups_path: &str) {
    if let Ok(Some(dir)) = cgroup_dir(Path::new(CGROUP_ROOT), cgroups_path) {
        if dir.exists() {
            remove(&dir);
        }
    }
}

fn remove(dir: &Path) {
    // The VMM may take a moment to leave the process table after it was killed.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!("removing the pod's cgroup {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_map_under_the_root_and_bad_ones_are_refused() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            cgroup_dir(root, "/kubepods/burstable/pod1/abc").unwrap(),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/burstable/pod1/abc"))
        );
        assert_eq!(
            cgroup_dir(root, "kubepods-pod1.slice:cri-containerd:abc").unwrap(),
            None
        );
        for bad in ["/kubepods/../../etc", "/", "relative/path", "/a/./b/.."] {
            assert!(cgroup_dir(root, bad).is_err(), "{bad}");
        }
    }
}

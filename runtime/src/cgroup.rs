//! A sandbox's cgroup on the host: the process that holds the microVM (the containerd shim,
//! or the keeper `brig create` leaves for podman) and the VMM run in the spec's
//! `linux.cgroupsPath` (CRI sets it under the pod's cgroup that kubelet made; podman under
//! its own parent), so a pod's whole overhead is accounted and limited where the engine
//! expects it, as runc's container processes are. cgroup v2, with cgroupfs paths (`/kubepods/…/<id>`) or systemd ones
//! (`slice:prefix:name`, which CRI sends when the pod's cgroup parent is a slice): those are
//! placed where systemd's driver puts them, `<slice, expanded>/<prefix>-<name>.scope`, by
//! writing cgroupfs directly (no transient unit over D-Bus), so the pod's overhead is
//! accounted in the pod's slice either way.

use std::path::{Component, Path, PathBuf};

/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Errors placing a process into a sandbox's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The path is not a plain absolute cgroupfs path.
    #[error("cgroupsPath {0:?} is neither an absolute cgroup path without '..' components nor a systemd slice:prefix:name")]
    BadPath(String),
    /// Creating or joining the cgroup failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A process's placement in a sandbox's cgroup, to be undone when the sandbox is gone.
#[derive(Debug)]
pub struct PodCgroup {
    /// The pod's cgroup directory (we made it if it did not exist).
    dir: PathBuf,
    /// The cgroup the process came from (where it goes back before removing `dir`).
    from: PathBuf,
}

/// The cgroup directory `cgroups_path` names under `root`.
fn cgroup_dir(root: &Path, cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    if !cgroups_path.starts_with('/') {
        let bad = || CgroupError::BadPath(cgroups_path.into());
        let mut parts = cgroups_path.split(':');
        let (Some(slice), Some(prefix), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let mut dir = root.to_path_buf();
        dir.push(expand_slice(slice).ok_or_else(bad)?);
        dir.push(systemd_unit(prefix, name).ok_or_else(bad)?);
        return Ok(dir);
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
    Ok(dir)
}

/// A systemd slice as cgroupfs directories, as systemd nests them: `a-b-c.slice` is
/// `a.slice/a-b.slice/a-b-c.slice`, `-.slice` (or none) the root, and the default is
/// `system.slice` as for runc. `None` for a name systemd would not take.
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    if slice == "-.slice" {
        return Some(PathBuf::new());
    }
    let stem = slice.strip_suffix(".slice")?;
    if !plain_name(stem) {
        return None;
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None; // ".slice", "-a.slice", "a-.slice", "a--b.slice"
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path)
}

/// The unit a systemd cgroup path names: a slice as itself, else `<prefix>-<name>.scope`.
fn systemd_unit(prefix: &str, name: &str) -> Option<String> {
    if name.is_empty() || !plain_name(name) || (!prefix.is_empty() && !plain_name(prefix)) {
        return None;
    }
    Some(if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    })
}

/// A single path component that cannot climb: no '/', not `.` or `..`, nothing odd.
fn plain_name(s: &str) -> bool {
    s != "."
        && s != ".."
        && !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
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
    pub fn enter(cgroups_path: &str) -> Result<Self, CgroupError> {
        Self::enter_under(Path::new(CGROUP_ROOT), cgroups_path)
    }

    fn enter_under(root: &Path, cgroups_path: &str) -> Result<Self, CgroupError> {
        let dir = cgroup_dir(root, cgroups_path)?;
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
        Ok(Self { dir, from })
    }

    /// Once the microVM is gone: go back where the process came from and remove the
    /// sandbox's cgroup (kubelet removes the pod's parent cgroup only when it is empty).
    pub fn leave(self) {
        if let Err(e) = join(&self.from, std::process::id()) {
            tracing::warn!("leaving the pod's cgroup: {e}");
        }
        remove(&self.dir);
    }
}

/// Remove the sandbox cgroup `cgroups_path` if it exists and is empty (after a holder that
/// died without leaving it: a killed shim or keeper).
pub fn remove_path(cgroups_path: &str) {
    if let Ok(dir) = cgroup_dir(Path::new(CGROUP_ROOT), cgroups_path) {
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
            PathBuf::from("/sys/fs/cgroup/kubepods/burstable/pod1/abc")
        );
        for bad in ["/kubepods/../../etc", "/", "relative/path", "/a/./b/.."] {
            assert!(cgroup_dir(root, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn systemd_paths_map_where_systemds_driver_puts_them() {
        let root = Path::new("/sys/fs/cgroup");
        let dir = |p: &str| cgroup_dir(root, p);
        assert_eq!(
            dir("kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            PathBuf::from(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            dir(":cri-containerd:abc").unwrap(),
            PathBuf::from("/sys/fs/cgroup/system.slice/cri-containerd-abc.scope")
        );
        assert_eq!(
            dir("-.slice::abc").unwrap(),
            PathBuf::from("/sys/fs/cgroup/abc.scope")
        );
        assert_eq!(
            dir("machine.slice:x:pods.slice").unwrap(),
            PathBuf::from("/sys/fs/cgroup/machine.slice/pods.slice")
        );
        for bad in [
            "a.slice:p",
            "a.slice:p:n:extra",
            "a:p:n",
            "a--b.slice:p:n",
            "a-.slice:p:n",
            ".slice:p:n",
            "-a.slice:p:n",
            "../x.slice:p:n",
            "a.slice:p:..",
            "a.slice:p/q:n",
            "a.slice:p:n/../../x",
            "a.slice:p:",
        ] {
            assert!(cgroup_dir(root, bad).is_err(), "{bad}");
        }
    }
}

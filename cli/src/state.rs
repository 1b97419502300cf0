//! What `brig` remembers about containers between commands: one directory per container
//! under `<root>/containers/<id>/` with `state.json` and the detached container's logs.
//! Its microVM lives under `<root>/sandboxes/<id>/`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The recorded state of a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    /// Container ID.
    pub id: String,
    /// The command line.
    pub command: Vec<String>,
    /// PID of the `brig` process that owns the microVM.
    pub monitor_pid: u32,
    /// PID of the VMM.
    pub vmm_pid: u32,
    /// `running` or `exited`.
    pub status: String,
    /// Exit status once exited.
    pub exit_code: Option<i32>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// Directory layout under the state root.
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root`.
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    /// Where sandboxes live (the runtime's state root).
    pub fn sandboxes(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// A container's directory.
    pub fn container(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    /// A container's sandbox directory.
    pub fn sandbox(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }

    /// IDs of all recorded containers.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.root.join("containers"))
            .map(|it| it.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Load a container's state; the error names the ID.
    pub fn load(&self, id: &str) -> anyhow::Result<ContainerState> {
        let path = self.container(id).join("state.json");
        let text = std::fs::read_to_string(&path).map_err(|_| anyhow::anyhow!("no such container: {id}"))?;
        let mut state: ContainerState =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("state of container {id} is unreadable: {e}"))?;
        // A monitor that is gone without recording an exit means the container is gone too.
        if state.status == "running" && !alive(state.monitor_pid) {
            state.status = "exited".into();
        }
        Ok(state)
    }

    /// Record a container's state (atomically).
    pub fn save(&self, state: &ContainerState) -> anyhow::Result<()> {
        let dir = self.container(&state.id);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        std::fs::rename(tmp, dir.join("state.json"))?;
        Ok(())
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

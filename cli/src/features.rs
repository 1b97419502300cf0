//! `brig features`: what this runtime can do with an OCI config, as the OCI runtime spec's
//! features document (runc's `features`). Fixed at build time; the lists come from
//! `brig_protocols::features`, which the agent's tests hold to what the guest really does.

use brig_protocols::features::{
    CAPABILITIES, MOUNT_OPTIONS, NAMESPACES, SECCOMP_ACTIONS, SECCOMP_ARCHS, SECCOMP_OPERATORS,
};
use oci_spec::runtime::{VERSION_MAJOR, VERSION_MINOR, VERSION_PATCH};

/// The features document.
pub fn document() -> serde_json::Value {
    serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": format!("{VERSION_MAJOR}.{VERSION_MINOR}.{VERSION_PATCH}"),
        // Every hook of the spec (see `hooks` for where each runs: startContainer in the
        // microVM, the others on the host).
        "hooks": [
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop"
        ],
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": NAMESPACES,
            "capabilities": CAPABILITIES,
            "cgroup": {
                "v1": false,
                "v2": true,
                "systemd": false,
                "systemdUser": false,
                "rdma": false
            },
            "seccomp": {
                "enabled": true,
                "actions": SECCOMP_ACTIONS,
                "operators": SECCOMP_OPERATORS,
                "archs": SECCOMP_ARCHS,
                "knownFlags": [],
                "supportedFlags": []
            },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false },
            "intelRdt": { "enabled": false }
        }
    })
}

pub fn run() -> anyhow::Result<u8> {
    crate::outln!("{}", serde_json::to_string_pretty(&document())?)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_has_the_specs_shape() {
        let doc = super::document();
        assert_eq!(doc["ociVersionMin"], "1.0.0");
        let hooks = doc["hooks"].as_array().unwrap();
        for hook in [
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststop",
        ] {
            assert!(hooks.contains(&hook.into()), "{hook}");
        }
        assert!(doc["mountOptions"]
            .as_array()
            .unwrap()
            .contains(&"rbind".into()));
        assert_eq!(doc["linux"]["cgroup"]["v2"], true);
        let actions = doc["linux"]["seccomp"]["actions"].as_array().unwrap();
        assert!(actions.contains(&"SCMP_ACT_ERRNO".into()));
        assert!(!actions.contains(&"SCMP_ACT_NOTIFY".into()));
    }
}

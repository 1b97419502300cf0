//! User namespaces, the way runc makes them: when the spec lists a `user` namespace without a
//! `path`, the container's init is cloned into a new user namespace together with its other
//! new namespaces, and the agent (in the guest's user namespace, the parent) writes
//! `linux.uidMappings` and `linux.gidMappings` to `/proc/PID/uid_map` and `gid_map` before
//! the init goes on (see `process::spawn`). Container IDs in the spec (`process.user`, file
//! owners inside) are relative to the mappings.
//!
//! Joining an existing user namespace by `path` is refused: the agent creates the container's
//! other namespaces with the same clone, so they could not belong to a joined one.

use std::fs::OpenOptions;
use std::io::Write;

use nix::unistd::Pid;
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Spec, User};

use super::ContainerError;

/// Most lines Linux takes in one `uid_map` or `gid_map` (since 4.15).
const MAX_MAPPINGS: usize = 340;
/// A map is written in one `write`, which must be shorter than a page.
const MAX_MAP_BYTES: usize = 4095;
/// The largest ID a mapping may cover: `(uid_t)-1` means "no ID".
const MAX_ID: u64 = u32::MAX as u64 - 1;

/// The checked ID mappings of a container's new user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMappings {
    /// `linux.uidMappings`.
    uid: Vec<LinuxIdMapping>,
    /// `linux.gidMappings`.
    gid: Vec<LinuxIdMapping>,
}

/// Whether `spec` asks for a new user namespace (a `user` entry without `path`).
pub fn asks_for_new(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .any(|ns| ns.typ() == LinuxNamespaceType::User && ns.path().is_none())
}

/// The user namespace `spec` asks for, checked: `None` when it asks for none (the container
/// shares the guest's). A bad combination is the caller's mistake (INVALID_ARGUMENT) and the
/// message names the field to fix.
pub fn from_spec(spec: &Spec) -> Result<Option<IdMappings>, ContainerError> {
    let linux = spec.linux().as_ref();
    let user_ns = linux
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
        .find(|ns| ns.typ() == LinuxNamespaceType::User);
    let uid = linux
        .and_then(|l| l.uid_mappings().clone())
        .unwrap_or_default();
    let gid = linux
        .and_then(|l| l.gid_mappings().clone())
        .unwrap_or_default();
    let Some(user_ns) = user_ns else {
        if uid.is_empty() && gid.is_empty() {
            return Ok(None);
        }
        let field = if uid.is_empty() {
            "linux.gidMappings"
        } else {
            "linux.uidMappings"
        };
        return Err(invalid(format!(
            "{field} is given but linux.namespaces has no `user` namespace: add \
             {{\"type\": \"user\"}} to linux.namespaces, or remove the mappings"
        )));
    };
    if let Some(path) = user_ns.path() {
        return Err(invalid(format!(
            "joining an existing user namespace ({}) is not supported: remove `path` from the \
             `user` entry of linux.namespaces to create a new user namespace from \
             linux.uidMappings and linux.gidMappings",
            path.display()
        )));
    }
    check_mappings("uid", "linux.uidMappings", &uid)?;
    check_mappings("gid", "linux.gidMappings", &gid)?;
    Ok(Some(IdMappings { uid, gid }))
}

fn invalid(message: String) -> ContainerError {
    ContainerError::InvalidArgument(message)
}

fn check_mappings(
    kind: &str,
    field: &str,
    mappings: &[LinuxIdMapping],
) -> Result<(), ContainerError> {
    if mappings.is_empty() {
        return Err(invalid(format!(
            "linux.namespaces asks for a new user namespace but {field} is empty: map container \
             {kind}s to guest {kind}s, e.g. [{{\"containerID\": 0, \"hostID\": 100000, \
             \"size\": 65536}}]"
        )));
    }
    if mappings.len() > MAX_MAPPINGS {
        return Err(invalid(format!(
            "{field} has {} entries; Linux takes at most {MAX_MAPPINGS}",
            mappings.len()
        )));
    }
    for (i, m) in mappings.iter().enumerate() {
        if m.size() == 0 {
            return Err(invalid(format!(
                "{field}[{i}] has size 0: give the number of {kind}s to map (1 or more)"
            )));
        }
        for (side, start) in [("containerID", m.container_id()), ("hostID", m.host_id())] {
            if u64::from(start) + u64::from(m.size()) - 1 > MAX_ID {
                return Err(invalid(format!(
                    "{field}[{i}] ({side} {start}, size {}) runs past the largest {kind} \
                     {MAX_ID}",
                    m.size()
                )));
            }
        }
        for (j, earlier) in mappings[..i].iter().enumerate() {
            for (side, start, other) in [
                ("container", m.container_id(), earlier.container_id()),
                ("host", m.host_id(), earlier.host_id()),
            ] {
                if overlap(start, m.size(), other, earlier.size()) {
                    return Err(invalid(format!(
                        "{field}[{i}] overlaps {field}[{j}] in {side} {kind}s: each {side} \
                         {kind} may be mapped only once"
                    )));
                }
            }
        }
    }
    if !maps(mappings, 0) {
        return Err(invalid(format!(
            "{field} does not map container {kind} 0: the container is set up as root of its \
             user namespace, so map container {kind} 0 (e.g. {{\"containerID\": 0, \"hostID\": \
             100000, \"size\": 65536}})"
        )));
    }
    let text = format_map(mappings);
    if text.len() > MAX_MAP_BYTES {
        return Err(invalid(format!(
            "{field} is {} bytes long when written out; Linux takes at most {MAX_MAP_BYTES}: \
             use fewer, larger ranges",
            text.len()
        )));
    }
    Ok(())
}

fn overlap(a: u32, a_size: u32, b: u32, b_size: u32) -> bool {
    let (a, a_end) = (u64::from(a), u64::from(a) + u64::from(a_size));
    let (b, b_end) = (u64::from(b), u64::from(b) + u64::from(b_size));
    a < b_end && b < a_end
}

fn maps(mappings: &[LinuxIdMapping], id: u32) -> bool {
    mappings.iter().any(|m| {
        let start = u64::from(m.container_id());
        (start..start + u64::from(m.size())).contains(&u64::from(id))
    })
}

/// The text of a `uid_map`/`gid_map`: one `CONTAINER-ID HOST-ID SIZE` line per mapping.
fn format_map(mappings: &[LinuxIdMapping]) -> String {
    mappings
        .iter()
        .map(|m| format!("{} {} {}\n", m.container_id(), m.host_id(), m.size()))
        .collect()
}

impl IdMappings {
    /// Checks that a process's user and groups (container IDs) are mapped: an unmapped one
    /// could not be switched to.
    pub fn check_user(&self, user: &User) -> Result<(), ContainerError> {
        if !maps(&self.uid, user.uid()) {
            return Err(invalid(format!(
                "process.user.uid {} is not mapped by linux.uidMappings: run as a mapped uid \
                 or extend the mappings",
                user.uid()
            )));
        }
        let gids = std::iter::once(("process.user.gid", user.gid())).chain(
            user.additional_gids()
                .iter()
                .flatten()
                .map(|g| ("process.user.additionalGids", *g)),
        );
        for (field, gid) in gids {
            if !maps(&self.gid, gid) {
                return Err(invalid(format!(
                    "{field} {gid} is not mapped by linux.gidMappings: use a mapped gid or \
                     extend the mappings"
                )));
            }
        }
        Ok(())
    }

    /// Writes the maps of the process `pid` (the agent's view), which was just cloned into a
    /// new user namespace and waits for them. From the parent user namespace with CAP_SETUID
    /// and CAP_SETGID any mapping may be written, and `setgroups` stays allowed.
    pub fn write(&self, pid: Pid) -> Result<(), ContainerError> {
        write_map(pid, "uid_map", &format_map(&self.uid))?;
        write_map(pid, "gid_map", &format_map(&self.gid))
    }
}

fn write_map(pid: Pid, file: &str, text: &str) -> Result<(), ContainerError> {
    let path = format!("/proc/{pid}/{file}");
    let fail = |err: &dyn std::fmt::Display| {
        ContainerError::Internal(format!(
            "cannot write the user namespace's mappings {:?} to {path}: {err}",
            text.trim_end()
        ))
    };
    let mut map = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|err| fail(&err))?;
    // The kernel takes a map in a single write only.
    let written = map.write(text.as_bytes()).map_err(|err| fail(&err))?;
    if written != text.len() {
        return Err(fail(&format!(
            "the kernel took {written} of {} bytes",
            text.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(linux: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2",
                 "process":{{"cwd":"/","args":["sh"],"user":{{"uid":0,"gid":0}}}},
                 "linux":{linux}}}"#
        ))
        .unwrap()
    }

    const MAP: &str = r#"[{"containerID":0,"hostID":100000,"size":65536}]"#;

    fn error(linux: &str) -> String {
        match from_spec(&spec(linux)) {
            Err(ContainerError::InvalidArgument(message)) => message,
            other => panic!("expected INVALID_ARGUMENT for {linux}, got {other:?}"),
        }
    }

    #[test]
    fn no_user_namespace_and_no_mappings_is_fine() {
        assert_eq!(
            from_spec(&spec(r#"{"namespaces":[{"type":"pid"}]}"#)).unwrap(),
            None
        );
        assert!(!asks_for_new(&spec(r#"{"namespaces":[{"type":"pid"}]}"#)));
    }

    #[test]
    fn a_new_user_namespace_with_mappings_is_accepted_and_written_as_lines() {
        let linux = format!(
            r#"{{"namespaces":[{{"type":"user"}},{{"type":"mount"}}],
                "uidMappings":{MAP},
                "gidMappings":[{{"containerID":0,"hostID":200000,"size":10}},
                               {{"containerID":10,"hostID":300000,"size":5}}]}}"#
        );
        let spec = spec(&linux);
        assert!(asks_for_new(&spec));
        let mappings = from_spec(&spec).unwrap().unwrap();
        assert_eq!(format_map(&mappings.uid), "0 100000 65536\n");
        assert_eq!(format_map(&mappings.gid), "0 200000 10\n10 300000 5\n");
    }

    #[test]
    fn a_user_namespace_needs_both_mappings() {
        let msg = error(r#"{"namespaces":[{"type":"user"}]}"#);
        assert!(msg.contains("linux.uidMappings is empty"), "{msg}");
        let msg = error(&format!(
            r#"{{"namespaces":[{{"type":"user"}}],"uidMappings":{MAP}}}"#
        ));
        assert!(msg.contains("linux.gidMappings is empty"), "{msg}");
    }

    #[test]
    fn mappings_need_a_user_namespace() {
        let msg = error(&format!(
            r#"{{"namespaces":[{{"type":"pid"}}],"uidMappings":{MAP},"gidMappings":{MAP}}}"#
        ));
        assert!(msg.contains("no `user` namespace"), "{msg}");
        assert!(msg.contains("linux.uidMappings"), "{msg}");
        let msg = error(&format!(r#"{{"gidMappings":{MAP}}}"#));
        assert!(msg.contains("linux.gidMappings is given"), "{msg}");
    }

    #[test]
    fn joining_a_user_namespace_by_path_is_refused() {
        let msg = error(&format!(
            r#"{{"namespaces":[{{"type":"user","path":"/proc/7/ns/user"}}],
                "uidMappings":{MAP},"gidMappings":{MAP}}}"#
        ));
        assert!(
            msg.contains("/proc/7/ns/user") && msg.contains("remove `path`"),
            "{msg}"
        );
    }

    #[test]
    fn bad_mappings_are_named() {
        let with_uids = |uids: &str| {
            error(&format!(
                r#"{{"namespaces":[{{"type":"user"}}],"uidMappings":{uids},"gidMappings":{MAP}}}"#
            ))
        };
        let msg = with_uids(r#"[{"containerID":0,"hostID":1000,"size":0}]"#);
        assert!(msg.contains("linux.uidMappings[0] has size 0"), "{msg}");
        let msg = with_uids(r#"[{"containerID":0,"hostID":4294967290,"size":10}]"#);
        assert!(
            msg.contains("hostID 4294967290") && msg.contains("runs past"),
            "{msg}"
        );
        let msg = with_uids(
            r#"[{"containerID":0,"hostID":1000,"size":10},{"containerID":5,"hostID":5000,"size":10}]"#,
        );
        assert!(
            msg.contains("[1] overlaps linux.uidMappings[0] in container uids"),
            "{msg}"
        );
        let msg = with_uids(
            r#"[{"containerID":0,"hostID":1000,"size":10},{"containerID":10,"hostID":1009,"size":1}]"#,
        );
        assert!(msg.contains("in host uids"), "{msg}");
        let msg = with_uids(r#"[{"containerID":1,"hostID":1000,"size":10}]"#);
        assert!(msg.contains("does not map container uid 0"), "{msg}");
        let many: Vec<String> = (0..341)
            .map(|i| format!(r#"{{"containerID":{i},"hostID":{},"size":1}}"#, 1000 + i))
            .collect();
        let msg = with_uids(&format!("[{}]", many.join(",")));
        assert!(msg.contains("341 entries"), "{msg}");
        // Adjacent ranges do not overlap; the largest ID is 2^32 - 2.
        let ok = format!(
            r#"{{"namespaces":[{{"type":"user"}}],
                "uidMappings":[{{"containerID":0,"hostID":1000,"size":10}},
                               {{"containerID":10,"hostID":1010,"size":10}},
                               {{"containerID":20,"hostID":4294967284,"size":11}}],
                "gidMappings":{MAP}}}"#
        );
        assert!(from_spec(&spec(&ok)).is_ok());
    }

    #[test]
    fn a_long_map_is_refused_before_the_kernel_does() {
        let many: Vec<String> = (0..300u64)
            .map(|i| {
                format!(
                    r#"{{"containerID":{},"hostID":{},"size":1}}"#,
                    i * 10_000_000,
                    4_000_000_000 + i * 10
                )
            })
            .collect();
        let msg = error(&format!(
            r#"{{"namespaces":[{{"type":"user"}}],"uidMappings":[{}],"gidMappings":{MAP}}}"#,
            many.join(",")
        ));
        assert!(msg.contains("bytes long"), "{msg}");
    }

    #[test]
    fn the_process_user_must_be_mapped() {
        let linux = r#"{"namespaces":[{"type":"user"}],
            "uidMappings":[{"containerID":0,"hostID":100000,"size":1000}],
            "gidMappings":[{"containerID":0,"hostID":100000,"size":1000}]}"#;
        let mappings = from_spec(&spec(linux)).unwrap().unwrap();
        let user = |json: &str| serde_json::from_str::<User>(json).unwrap();
        assert!(mappings.check_user(&user(r#"{"uid":999,"gid":0}"#)).is_ok());
        let msg = mappings
            .check_user(&user(r#"{"uid":1000,"gid":0}"#))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("process.user.uid 1000 is not mapped"), "{msg}");
        let msg = mappings
            .check_user(&user(r#"{"uid":0,"gid":0,"additionalGids":[5,2000]}"#))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("process.user.additionalGids 2000"), "{msg}");
    }
}

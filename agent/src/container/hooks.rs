//! A container's `startContainer` hooks, which the OCI runtime spec runs in the container's
//! namespaces after `start` and before the command: the container's init runs them, as
//! runc's init does, once the start byte came (and the seccomp profile of a process with
//! no_new_privileges is in place), as the container's user, in its working directory, and
//! only if all succeed does it execute the command.
//!
//! Each hook is `path` (in the container's root filesystem) with its `args` (the first is its
//! argv[0]) and `env` (none given: the process's), the state on stdin — `ociVersion`, `id`,
//! `status` "created", `pid` (the init's, in the container's pid namespace, as runc's
//! `getpid()`), `bundle` (the host's path) and `annotations` — and killed with its process
//! group after `timeout` seconds. All of a container's hooks together get at most
//! [`TIME_LIMIT`] (a hook without a `timeout` too): the host waits for StartContainer's answer
//! for 30 s, and a start must not go on in the guest after the host gave up. The host keeps every other kind of hook (see
//! `brig_runtime::spec::guest_hooks`); the agent checks these with the spec
//! ([`check`]: bounded, absolute paths, no NUL bytes) before the container exists.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Spec};
use serde::{Deserialize, Serialize};

use super::ContainerError;

/// Most `startContainer` hooks a container may have.
pub const MAX_HOOKS: usize = 16;
/// Most `args` or `env` entries of one hook.
pub const MAX_HOOK_STRINGS: usize = 256;
/// Longest path, argument or variable of a hook, in bytes.
pub const MAX_HOOK_STRING: usize = 4096;
/// How long a container's `startContainer` hooks may take together, below the host's 30 s
/// for a StartContainer call.
pub const TIME_LIMIT: Duration = Duration::from_secs(25);
/// Bytes of a failing hook's stderr kept for the error (its end).
const STDERR_TAIL: usize = 2048;
/// How often a running hook is looked at when it is quiet.
const POLL_INTERVAL_MS: u16 = 20;

/// What the init needs to tell a hook about its container beyond the spec: the host's words.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HookContext {
    /// The container's ID.
    pub id: String,
    /// The bundle's path on the host ("" when the host gave none).
    pub bundle: String,
    /// The spec's annotations, without the one that carried the bundle.
    pub annotations: HashMap<String, String>,
}

impl HookContext {
    /// The context of container `id` from its spec, if the spec has `startContainer` hooks.
    pub fn of(id: &str, spec: &Spec) -> Option<HookContext> {
        start_hooks(spec).first()?;
        let mut annotations = spec.annotations().clone().unwrap_or_default();
        let bundle = annotations
            .remove(brig_protocols::BUNDLE_ANNOTATION)
            .unwrap_or_default();
        Some(HookContext {
            id: id.to_string(),
            bundle,
            annotations,
        })
    }

    /// The state document a hook reads: status "created" and the init's `pid`.
    pub fn state(&self, oci_version: &str, pid: i32) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": oci_version,
            "id": self.id,
            "status": "created",
            "pid": pid,
            "bundle": self.bundle,
            "annotations": self.annotations,
        })
    }
}

/// The spec's `startContainer` hooks (none: empty).
pub fn start_hooks(spec: &Spec) -> &[Hook] {
    spec.hooks()
        .as_ref()
        .and_then(|h| h.start_container().as_deref())
        .unwrap_or_default()
}

/// Refuses `startContainer` hooks the init could not run as given: too many, a path that is
/// not absolute, too many or too long arguments or variables, a NUL byte, a timeout that is
/// not positive.
pub fn check(spec: &Spec) -> Result<(), ContainerError> {
    let hooks = start_hooks(spec);
    let invalid = |i: usize, what: String| {
        ContainerError::InvalidArgument(format!(
            "invalid OCI spec: hooks.startContainer[{i}]: {what}"
        ))
    };
    if hooks.len() > MAX_HOOKS {
        return Err(ContainerError::InvalidArgument(format!(
            "invalid OCI spec: hooks.startContainer has {} hooks, more than {MAX_HOOKS}",
            hooks.len()
        )));
    }
    for (i, hook) in hooks.iter().enumerate() {
        let path = hook.path().as_os_str().as_encoded_bytes();
        if !hook.path().is_absolute() {
            return Err(invalid(
                i,
                format!("path {:?} is not absolute", hook.path()),
            ));
        }
        for (what, list) in [("args", hook.args()), ("env", hook.env())] {
            let list = list.as_deref().unwrap_or_default();
            if list.len() > MAX_HOOK_STRINGS {
                return Err(invalid(
                    i,
                    format!(
                        "{what} has {} entries, more than {MAX_HOOK_STRINGS}",
                        list.len()
                    ),
                ));
            }
            if let Some(long) = list.iter().position(|s| s.len() > MAX_HOOK_STRING) {
                return Err(invalid(
                    i,
                    format!("{what}[{long}] is longer than {MAX_HOOK_STRING} bytes"),
                ));
            }
            if let Some(nul) = list.iter().position(|s| s.contains('\0')) {
                return Err(invalid(i, format!("{what}[{nul}] contains a NUL byte")));
            }
        }
        if path.len() > MAX_HOOK_STRING || path.contains(&0) {
            return Err(invalid(
                i,
                format!("path is longer than {MAX_HOOK_STRING} bytes or contains a NUL byte"),
            ));
        }
        if hook.timeout().is_some_and(|t| t <= 0) {
            return Err(invalid(i, "timeout must be greater than zero".into()));
        }
    }
    Ok(())
}

/// Runs `hooks` in order, each with `state` on stdin and, when it gives no `env` of its own,
/// `env`. The first that fails is the error, in words for the user; the rest do not run.
pub fn run(hooks: &[Hook], state: &[u8], env: &[String]) -> Result<(), String> {
    let started = Instant::now();
    for (i, hook) in hooks.iter().enumerate() {
        let left = TIME_LIMIT.saturating_sub(started.elapsed());
        run_one(hook, state, env, left).map_err(|why| {
            format!(
                "hooks.startContainer[{i}] ({}) failed, so the container's command did not \
                 run: {why}",
                hook.path().display()
            )
        })?;
    }
    Ok(())
}

fn run_one(hook: &Hook, state: &[u8], env: &[String], left: Duration) -> Result<(), String> {
    let mut cmd = Command::new(hook.path());
    if let Some((first, rest)) = hook.args().as_deref().unwrap_or_default().split_first() {
        cmd.arg0(first).args(rest);
    }
    cmd.env_clear();
    for pair in hook.env().as_deref().unwrap_or(env) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        cmd.env(key, value);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that a timeout kills what it started too.
        .process_group(0)
        .spawn()
        .map_err(|err| format!("cannot start it: {err}"))?;
    let own = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t.unsigned_abs()))
        .filter(|own| *own <= left);
    let (status, stderr) = follow(&mut child, state, own.unwrap_or(left))?;
    let stderr = String::from_utf8_lossy(&stderr);
    let limit = match own {
        Some(own) => format!("its timeout of {} s", own.as_secs()),
        None => format!(
            "the {} s a container's startContainer hooks get together",
            TIME_LIMIT.as_secs()
        ),
    };
    match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("{status}; stderr: {:?}", stderr.trim_end())),
        None => Err(format!(
            "it did not finish within {limit} and was killed; stderr: {:?}",
            stderr.trim_end()
        )),
    }
}

/// Feeds `child` its stdin, keeps the end of its stderr and drains its stdout until it exits
/// (its status) or `timeout` passes (killed with its group: `None`). Single-threaded, as the
/// container's init is: one poll(2) loop.
fn follow(
    child: &mut Child,
    mut input: &[u8],
    timeout: Duration,
) -> Result<(Option<ExitStatus>, Vec<u8>), String> {
    let started = Instant::now();
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    for fd in [
        stdin.as_ref().map(|s| s.as_raw_fd()),
        stdout.as_ref().map(|s| s.as_raw_fd()),
        stderr.as_ref().map(|s| s.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(fd);
    }
    let mut tail = Vec::new();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|err| format!("cannot wait for it: {err}"))?
        {
            // What it wrote before it exited; descendants holding the pipes are not waited for.
            drain(&mut stdout, &mut Vec::new());
            drain(&mut stderr, &mut tail);
            return Ok((Some(status), tail));
        }
        let left = match timeout.checked_sub(started.elapsed()) {
            Some(left) if !left.is_zero() => left,
            _ => {
                if let Ok(group) = libc::pid_t::try_from(child.id()) {
                    // SAFETY: kill(2) with plain integers: the hook's process group.
                    unsafe { libc::kill(-group, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
                drain(&mut stderr, &mut tail);
                return Ok((None, tail));
            }
        };
        let wait_ms = u16::try_from(left.as_millis())
            .map_or(POLL_INTERVAL_MS, |ms| ms.clamp(1, POLL_INTERVAL_MS));
        let mut fds = Vec::with_capacity(3);
        if let Some(s) = &stdin {
            fds.push(libc::pollfd {
                fd: s.as_fd().as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        for s in [
            stdout.as_ref().map(|s| s.as_raw_fd()),
            stderr.as_ref().map(|s| s.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        {
            fds.push(libc::pollfd {
                fd: s,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // SAFETY: poll(2) on a live array of `fds.len()` pollfd structures, all open fds.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                i32::from(wait_ms),
            )
        };
        if let Some(pipe) = &mut stdin {
            match pipe.write(input) {
                Ok(n) if n < input.len() => input = &input[n..],
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                // All written (or it closed its stdin, which is its business): EOF.
                _ => stdin = None,
            }
        }
        drain(&mut stdout, &mut Vec::new());
        drain(&mut stderr, &mut tail);
    }
}

/// Reads what `pipe` has now (non-blocking), keeping the last [`STDERR_TAIL`] bytes in
/// `tail`; closes it at EOF.
fn drain<R: Read>(pipe: &mut Option<R>, tail: &mut Vec<u8>) {
    let Some(reader) = pipe else {
        return;
    };
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => {
                *pipe = None;
                return;
            }
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                let excess = tail.len().saturating_sub(STDERR_TAIL);
                tail.drain(..excess);
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => {
                *pipe = None;
                return;
            }
        }
    }
}

fn set_nonblocking(fd: std::os::fd::RawFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    // SAFETY: fd belongs to a pipe end the caller holds; the borrow ends with this call.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    if let Ok(flags) = fcntl(borrowed, FcntlArg::F_GETFL) {
        let _ = fcntl(
            borrowed,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","annotations":{{"a":"1","{}":"/host/bundle"}},"hooks":{hooks}}}"#,
            brig_protocols::BUNDLE_ANNOTATION
        ))
        .unwrap()
    }

    fn hooks(json: &str) -> Vec<Hook> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_state_names_the_container_its_host_bundle_and_its_own_annotations() {
        let hooked = spec(r#"{"startContainer":[{"path":"/bin/true"}]}"#);
        let context = HookContext::of("web", &hooked).unwrap();
        assert_eq!(
            context.state("1.0.2", 1),
            serde_json::json!({"ociVersion":"1.0.2","id":"web","status":"created","pid":1,
                "bundle":"/host/bundle","annotations":{"a":"1"}})
        );
        let none: Spec = serde_json::from_str(r#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert_eq!(HookContext::of("web", &none), None);
        assert_eq!(
            HookContext::of("web", &spec(r#"{"startContainer":[]}"#)),
            None
        );
    }

    #[test]
    fn hooks_beyond_the_bounds_are_invalid_arguments() {
        let long = "a".repeat(MAX_HOOK_STRING + 1);
        let many: Vec<serde_json::Value> = (0..=MAX_HOOKS)
            .map(|_| serde_json::json!({"path": "/bin/true"}))
            .collect();
        for (hooks, words) in [
            (r#"{"startContainer":[{"path":"bin/hook"}]}"#.to_string(), "[0]: path \"bin/hook\" is not absolute"),
            (
                serde_json::json!({"startContainer": many}).to_string(),
                "has 17 hooks, more than 16",
            ),
            (
                serde_json::json!({"startContainer": [{"path": "/a", "args": ["a", long]}]})
                    .to_string(),
                "[0]: args[1] is longer than 4096 bytes",
            ),
            (
                serde_json::json!({"startContainer": [{"path": "/a"}, {"path": "/a", "env": ["A=\u{0}"]}]})
                    .to_string(),
                "[1]: env[0] contains a NUL byte",
            ),
            (
                r#"{"startContainer":[{"path":"/a","timeout":0}]}"#.to_string(),
                "timeout must be greater than zero",
            ),
        ] {
            let err = check(&spec(&hooks)).unwrap_err();
            assert!(matches!(err, ContainerError::InvalidArgument(_)), "{err}");
            assert!(err.to_string().contains(words), "{err} lacks {words}");
        }
        // Other kinds of hook are the host's: not the agent's to judge.
        check(&spec(
            r#"{"startContainer":[{"path":"/a","args":["a"],"env":["A=1"],"timeout":5}],
                "prestart":[{"path":"relative"}]}"#,
        ))
        .unwrap();
    }

    #[test]
    fn hooks_run_in_order_with_the_state_args_and_env() {
        let _children = crate::CHILDREN_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("brig-agent-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let hooks = hooks(&format!(
            r#"[{{"path":"/bin/sh","args":["first","-c","cat > {0}; echo \" $0 $X\" >> {0}"]}},
                {{"path":"/bin/sh","args":["sh","-c","echo second $X >> {0}"],"env":["X=own"]}}]"#,
            out.display()
        ));
        run(&hooks, br#"{"id":"c1"}"#, &["X=process".to_string()]).unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(written, "{\"id\":\"c1\"} first process\nsecond own\n");
    }

    #[test]
    fn a_failing_or_slow_hook_says_which_how_and_the_end_of_its_stderr() {
        let _children = crate::CHILDREN_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let failing = hooks(
            r#"[{"path":"/bin/true"},
                {"path":"/bin/sh","args":["sh","-c","head -c 5000 /dev/zero | tr '\\0' x >&2; echo not ready >&2; exit 3"]}]"#,
        );
        let err = run(&failing, b"{}", &[]).unwrap_err();
        assert!(
            err.starts_with(
                "hooks.startContainer[1] (/bin/sh) failed, so the container's command did not \
                 run: exit status: 3; stderr: \""
            ),
            "{err}"
        );
        assert!(err.ends_with("xxxnot ready\""), "{err}");
        assert!(err.len() < STDERR_TAIL + 200, "{}", err.len());

        // A state larger than a pipe holds reaches a hook that reads it; one that never
        // reads it is not waited for beyond its exit.
        let big = vec![b'x'; 200_000];
        let counting = hooks(r#"[{"path":"/bin/sh","args":["sh","-c","test $(wc -c) = 200000"]}]"#);
        run(&counting, &big, &[]).unwrap();
        run(&hooks(r#"[{"path":"/bin/true"}]"#), &big, &[]).unwrap();

        let slow = hooks(
            r#"[{"path":"/bin/sh","args":["sh","-c","echo waiting >&2; sleep 30 & sleep 30"],"timeout":1}]"#,
        );
        let started = Instant::now();
        let err = run(&slow, b"{}", &[]).unwrap_err();
        assert!(
            err.contains("timeout of 1 s and was killed; stderr: \"waiting\""),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));

        let err = run(&hooks(r#"[{"path":"/no/such/hook"}]"#), b"{}", &[]).unwrap_err();
        assert!(
            err.starts_with("hooks.startContainer[0] (/no/such/hook)")
                && err.contains("cannot start it"),
            "{err}"
        );
    }
}

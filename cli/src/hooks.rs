//! OCI hooks (`hooks` in config.json), run as runc runs them: each with the container's state
//! as JSON on stdin, its own `args` (the first is its argv[0]) and `env` (none given: ours),
//! and a `timeout` in seconds after which it is killed.
//!
//! Where each runs, mapped onto a microVM as Kata Containers maps them:
//! - On the host, whose paths they name: `prestart` (deprecated) and `createRuntime` once the
//!   container is created, then `createContainer`; a failure stops the container (`create`
//!   fails and leaves nothing). `poststart` once it started and `poststop` once it is deleted;
//!   a failure there is a warning.
//! - `createContainer` is meant for the container's namespaces, but those are in the
//!   microVM, where a host binary cannot run. It runs on the host in the network namespace the
//!   microVM's VMM runs in, which is where the container's traffic leaves the host: the one
//!   the spec names (an engine's, made with CNI), entered with setns(2) between fork and exec;
//!   with none named (the guest then has loopback only) the VMM and the hook stay in ours.
//! - `startContainer` names a path in the container's root filesystem: the guest's agent
//!   runs it in the container's namespaces, as the container's user, after `start` and right
//!   before the command (see `brig_runtime::spec::guest_hooks`, which keeps only those in the
//!   spec the guest gets, and the agent's container init). Its failure is `start`'s: the
//!   command never runs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use oci_spec::runtime::{Hook, Hooks, Spec};

/// Hook output kept for an error message, bytes per stream.
const MAX_OUTPUT: u64 = 4096;

/// The moments of a container's life at which the host runs hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    /// After create, before `create` returns: `prestart`, `createRuntime`, then
    /// `createContainer`.
    Created,
    /// After the process started: `poststart`.
    Started,
    /// After delete: `poststop`.
    Deleted,
}

/// A container's host hooks, and the network namespace its createContainer hooks run in.
#[derive(Debug, Clone, Default)]
pub struct HostHooks {
    pub hooks: Option<Hooks>,
    /// The network namespace the microVM's VMM runs in, if the spec names one.
    pub netns: Option<std::path::PathBuf>,
}

impl HostHooks {
    /// Run the hooks of `moment` with the container's state on stdin (blocking: hooks are
    /// short programs, and nothing else of this container moves meanwhile).
    pub async fn run(
        &self,
        moment: Moment,
        state: &brig_runtime::state::ContainerState,
    ) -> anyhow::Result<()> {
        let hooks = self.hooks.clone();
        let netns = self.netns.clone();
        let document = crate::state::document(state);
        tokio::task::spawn_blocking(move || {
            run(hooks.as_ref(), moment, &document, netns.as_deref())
        })
        .await
        .context("running hooks")?
    }

    /// The hooks in the config.json of `bundle` (none if it cannot be read): for a container
    /// deleted by another process than its keeper.
    pub fn of_bundle(bundle: &Path) -> Self {
        Self {
            hooks: brig_runtime::spec::load_target(bundle)
                .ok()
                .and_then(|target| target.spec.hooks().clone()),
            netns: None,
        }
    }

    /// The poststop hooks, once the container of `state` is gone; a failing one is a warning
    /// (the spec's rule): the container stays deleted.
    pub async fn poststop(&self, mut state: brig_runtime::state::ContainerState) {
        state.status = brig_runtime::state::Status::Stopped;
        if let Err(e) = self.run(Moment::Deleted, &state).await {
            eprintln!("brig: warning: {e:#}");
        }
    }
}

/// Refuse hooks the spec does not allow, before anything exists: a hook's path must be
/// absolute (on the host, or in the container's root filesystem for `startContainer`, whose
/// further limits the guest's agent checks when the container is created).
pub fn check(spec: &Spec) -> anyhow::Result<()> {
    let Some(hooks) = spec.hooks() else {
        return Ok(());
    };
    #[allow(deprecated)]
    let lists = [
        ("prestart", hooks.prestart()),
        ("createRuntime", hooks.create_runtime()),
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
        ("poststart", hooks.poststart()),
        ("poststop", hooks.poststop()),
    ];
    for (name, list) in lists {
        for (i, hook) in list.iter().flatten().enumerate() {
            anyhow::ensure!(
                hook.path().is_absolute(),
                "hooks.{name}[{i}]: path {} is not absolute (the OCI runtime spec requires \
                 an absolute path)",
                hook.path().display()
            );
        }
    }
    Ok(())
}

/// Run the hooks of `moment` in order with `state` on stdin; `createContainer` hooks in the
/// network namespace `netns` when given (see the module's documentation). The first failure
/// ends the run and is the error.
pub fn run(
    hooks: Option<&Hooks>,
    moment: Moment,
    state: &serde_json::Value,
    netns: Option<&Path>,
) -> anyhow::Result<()> {
    let Some(hooks) = hooks else {
        return Ok(());
    };
    let lists: Vec<(&str, &Option<Vec<Hook>>)> = match moment {
        #[allow(deprecated)]
        Moment::Created => vec![
            ("prestart", hooks.prestart()),
            ("createRuntime", hooks.create_runtime()),
            ("createContainer", hooks.create_container()),
        ],
        Moment::Started => vec![("poststart", hooks.poststart())],
        Moment::Deleted => vec![("poststop", hooks.poststop())],
    };
    let input = serde_json::to_vec(state)?;
    for (name, list) in lists {
        let in_netns = match netns {
            Some(path) if name == "createContainer" && list.iter().flatten().next().is_some() => {
                Some(File::open(path).with_context(|| {
                    format!(
                        "hooks.{name}: opening the network namespace {}",
                        path.display()
                    )
                })?)
            }
            _ => None,
        };
        for (i, hook) in list.iter().flatten().enumerate() {
            run_one(hook, &input, in_netns.as_ref())
                .with_context(|| format!("hooks.{name}[{i}] ({})", hook.path().display()))?;
        }
    }
    Ok(())
}

fn run_one(hook: &Hook, input: &[u8], netns: Option<&File>) -> anyhow::Result<()> {
    let mut cmd = Command::new(hook.path());
    if let Some(netns) = netns {
        let fd = netns.as_raw_fd();
        // SAFETY: setns(2) is a single async-signal-safe system call on a descriptor that
        // stays open (borrowed from the caller) until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    if let Some(args) = hook.args() {
        if let Some((first, rest)) = args.split_first() {
            cmd.arg0(first).args(rest);
        }
    }
    if let Some(env) = hook.env() {
        cmd.env_clear();
        for pair in env {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            cmd.env(key, value);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start it")?;
    // A hook that does not read its stdin must not block us: the state is small, and a
    // closed pipe is its business.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let readers = [
        keep_output(child.stdout.take()),
        keep_output(child.stderr.take()),
    ];
    let timeout = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| Duration::from_secs(t.unsigned_abs()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for it")? {
            break Some(status);
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
    match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => anyhow::bail!(
            "it failed ({status}); stdout: {:?}, stderr: {:?}",
            stdout.trim_end(),
            stderr.trim_end()
        ),
        None => anyhow::bail!(
            "it did not finish within its timeout of {} s and was killed",
            timeout.map_or(0, |t| t.as_secs())
        ),
    }
}

/// Read up to [`MAX_OUTPUT`] bytes of a hook's output stream on a thread of its own, and
/// drain the rest so that the hook never blocks on a full pipe.
fn keep_output<R: Read + Send + 'static>(stream: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(stream) = stream {
            let mut limited = stream.take(MAX_OUTPUT);
            let _ = limited.read_to_string(&mut text);
            let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
        }
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(json: &str) -> Hooks {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn hooks_get_the_state_args_and_env_and_run_in_order() {
        let dir = std::env::temp_dir().join(format!("brig-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let hooks = hooks(&format!(
            r#"{{"prestart":[{{"path":"/bin/sh","args":["first","-c","cat > {0}; echo \" $0 $X\" >> {0}"],"env":["X=1"]}}],
                 "createRuntime":[{{"path":"/bin/sh","args":["sh","-c","echo second >> {0}"]}}],
                 "poststart":[{{"path":"/bin/sh","args":["sh","-c","echo not-now >> {0}"]}}]}}"#,
            out.display()
        ));
        let state = serde_json::json!({"id": "c1", "status": "created"});
        run(Some(&hooks), Moment::Created, &state, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            r#"{"id":"c1","status":"created"} first 1"#.to_string() + "\nsecond\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failing_or_slow_hook_is_an_error_that_says_why() {
        let state = serde_json::json!({});
        let failing = hooks(
            r#"{"poststop":[{"path":"/bin/sh","args":["sh","-c","echo no way >&2; exit 4"]}]}"#,
        );
        let err = run(Some(&failing), Moment::Deleted, &state, None).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.starts_with("hooks.poststop[0] (/bin/sh)"), "{err}");
        assert!(
            err.contains("exit status: 4") && err.contains("no way"),
            "{err}"
        );

        let slow =
            hooks(r#"{"poststart":[{"path":"/bin/sleep","args":["sleep","30"],"timeout":1}]}"#);
        let started = Instant::now();
        let err = format!(
            "{:#}",
            run(Some(&slow), Moment::Started, &state, None).unwrap_err()
        );
        assert!(err.contains("timeout of 1 s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));

        let missing = hooks(r#"{"createRuntime":[{"path":"/no/such/hook"}]}"#);
        let err = format!(
            "{:#}",
            run(Some(&missing), Moment::Created, &state, None).unwrap_err()
        );
        assert!(
            err.contains("/no/such/hook") && err.contains("cannot start it"),
            "{err}"
        );
    }

    #[test]
    fn every_kind_of_hook_is_accepted_with_an_absolute_path_only() {
        let mut spec = Spec::default();
        spec.set_hooks(Some(hooks(
            r#"{"createRuntime":[{"path":"/bin/true"}],"createContainer":[{"path":"/bin/true"}],
                "startContainer":[{"path":"/in/the/rootfs"}]}"#,
        )));
        check(&spec).unwrap();
        spec.set_hooks(Some(hooks(
            r#"{"startContainer":[{"path":"/a"},{"path":"bin/hook"}]}"#,
        )));
        let err = check(&spec).unwrap_err().to_string();
        assert!(
            err.starts_with("hooks.startContainer[1]: path bin/hook is not absolute"),
            "{err}"
        );
    }

    #[test]
    fn create_container_hooks_run_after_create_runtime_in_the_network_namespace_given() {
        let dir = std::env::temp_dir().join(format!("brig-hooks-netns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        let hooks = hooks(&format!(
            r#"{{"createContainer":[{{"path":"/bin/sh","args":["sh","-c","echo container $(readlink /proc/self/ns/net) >> {0}"]}}],
                 "createRuntime":[{{"path":"/bin/sh","args":["sh","-c","echo runtime >> {0}"]}}]}}"#,
            out.display()
        ));
        let state = serde_json::json!({"id": "c1"});
        // Our own namespace stands for the VMM's: setns into it is allowed to root and to
        // nobody else, and it is the one the hook must report.
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        let result = run(
            Some(&hooks),
            Moment::Created,
            &state,
            Some(Path::new("/proc/self/ns/net")),
        );
        let written = std::fs::read_to_string(&out).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        if nix::unistd::geteuid().is_root() {
            result.unwrap();
            assert_eq!(written, format!("runtime\ncontainer {}\n", ours.display()));
        } else {
            let err = format!("{:#}", result.unwrap_err());
            assert!(
                err.starts_with("hooks.createContainer[0] (/bin/sh)"),
                "{err}"
            );
            assert_eq!(written, "runtime\n");
        }

        let missing = super::tests::hooks(r#"{"createContainer":[{"path":"/bin/true"}]}"#);
        let err = run(
            Some(&missing),
            Moment::Created,
            &state,
            Some(Path::new("/no/such/netns")),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("opening the network namespace /no/such/netns"),
            "{err:#}"
        );
    }
}

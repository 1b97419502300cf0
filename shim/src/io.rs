//! A process's stdio between containerd's side (FIFOs, or a `file://` log) and the
//! process's vsock streams in the guest.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use brig_runtime::container::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// How long the output still gets to drain once the process exited (a child the process
/// left behind may hold its stdout open for ever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// What stdin still gets copied after CloseIO (what the client wrote before closing).
const STDIN_DRAIN: Duration = Duration::from_millis(100);

/// Where containerd wants a process's stdio, as the task API names it.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// One output destination.
enum Sink {
    Fifo(PathBuf),
    File(PathBuf),
    /// A logger program (`binary:///path?arg=value`), which reads stdout on fd 3 and stderr
    /// on fd 4, and closes fd 5 when it is ready, as containerd's loggers do.
    Binary {
        path: PathBuf,
        args: Vec<String>,
    },
}

/// How long a logger program gets to say it is ready (close fd 5).
const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a process's logger logs for: `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its
/// environment.
pub struct LogFor<'a> {
    pub container: &'a str,
    pub namespace: &'a str,
}

impl StdioPaths {
    /// The paths of a task or exec request, checked (see [`Self::check`]).
    pub fn checked(
        stdin: &str,
        stdout: &str,
        stderr: &str,
        terminal: bool,
    ) -> Result<Self, String> {
        let paths = Self {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
        };
        paths.check()?;
        Ok(paths)
    }

    /// Refuse what this shim cannot serve, before anything is created.
    pub fn check(&self) -> Result<(), String> {
        for uri in [&self.stdout, &self.stderr] {
            if let Some(Sink::Binary { .. }) = sink(uri)? {
                // One logger takes both streams (containerd gives it as both).
                if ![&self.stdout, &self.stderr]
                    .iter()
                    .all(|u| u.is_empty() || u == &uri)
                {
                    return Err(format!(
                        "log URI {uri:?}: a binary:// logger must take both stdout and stderr"
                    ));
                }
            }
        }
        if let Some(rest) = self
            .stdin
            .strip_prefix("binary://")
            .or(self.stdin.strip_prefix("file://"))
        {
            return Err(format!("stdin {rest:?}: stdin must be a FIFO path"));
        }
        Ok(())
    }
}

fn sink(uri: &str) -> Result<Option<Sink>, String> {
    if uri.is_empty() {
        return Ok(None);
    }
    if let Some(path) = uri.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(format!("log URI {uri:?}: the file path must be absolute"));
        }
        return Ok(Some(Sink::File(path.into())));
    }
    if let Some(rest) = uri.strip_prefix("binary://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let path = percent_decode(path)
            .ok_or_else(|| format!("log URI {uri:?}: bad %-escape in the path"))?;
        if !path.starts_with('/') {
            return Err(format!(
                "log URI {uri:?}: the logger's path must be absolute (binary:///path/to/logger)"
            ));
        }
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            for part in [key, value] {
                let part = percent_decode(&part.replace('+', " "))
                    .ok_or_else(|| format!("log URI {uri:?}: bad %-escape in {pair:?}"))?;
                if !part.is_empty() {
                    args.push(part);
                }
            }
        }
        return Ok(Some(Sink::Binary {
            path: path.into(),
            args,
        }));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(format!(
            "log URI {uri:?}: unknown scheme {scheme:?}; use FIFOs or file://"
        ));
    }
    Ok(Some(Sink::Fifo(uri.into())))
}

/// `%XX` escapes of a URI component decoded; `None` for a bad escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The copying of one process's stdio.
pub struct Relay {
    outputs: Vec<JoinHandle<()>>,
    close_stdin: Arc<Notify>,
}

impl Relay {
    /// Start copying between `paths` and the process's `stdio`.
    pub async fn start(paths: &StdioPaths, stdio: Stdio, who: LogFor<'_>) -> std::io::Result<Self> {
        let Stdio {
            stdin,
            stdout,
            stderr,
        } = stdio;
        let close_stdin = Arc::new(Notify::new());
        if let (Some(to_process), false) = (stdin, paths.stdin.is_empty()) {
            // Read-write: a FIFO whose writer is not open yet would read as EOF at once.
            // The client's end of stdin comes as CloseIO instead.
            let from_client = pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&paths.stdin)?;
            tokio::spawn(copy_stdin(from_client, to_process, close_stdin.clone()));
        }
        let mut outputs = Vec::new();
        let binary = [&paths.stdout, &paths.stderr]
            .into_iter()
            .find_map(|uri| match sink(uri) {
                Ok(Some(Sink::Binary { path, args })) => Some((path, args)),
                _ => None,
            });
        if let Some((path, args)) = binary {
            let (to_stdout, to_stderr) = start_logger(&path, &args, &who).await?;
            for (stream, to) in [(stdout, to_stdout), (stderr, to_stderr)] {
                if let Some(stream) = stream {
                    outputs.push(tokio::spawn(copy_out(stream, Box::new(to))));
                }
            }
            return Ok(Self {
                outputs,
                close_stdin,
            });
        }
        for (stream, uri) in [(stdout, &paths.stdout), (stderr, &paths.stderr)] {
            let (Some(stream), Ok(Some(sink))) = (stream, sink(uri)) else {
                continue;
            };
            let out = open_sink(&sink)?;
            outputs.push(tokio::spawn(copy_out(stream, out)));
        }
        Ok(Self {
            outputs,
            close_stdin,
        })
    }

    /// What containerd's CloseIO notifies: the client closed its stdin.
    pub fn stdin_closer(&self) -> Arc<Notify> {
        self.close_stdin.clone()
    }

    /// Wait (bounded) until the process's output is all copied.
    pub async fn drain(&mut self) {
        for handle in self.outputs.drain(..) {
            let abort = handle.abort_handle();
            if tokio::time::timeout(DRAIN_TIMEOUT, handle).await.is_err() {
                tracing::debug!("output still open after the process exited; stop copying it");
                abort.abort();
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for handle in &self.outputs {
            handle.abort();
        }
    }
}

/// Start the logger program `path ARGS` with the read ends of two pipes as fds 3 (stdout)
/// and 4 (stderr) and the write end of a third as fd 5; wait until it closes fd 5. Returns
/// the write ends of the stdout and stderr pipes. The logger runs until both reach EOF.
async fn start_logger(
    path: &std::path::Path,
    args: &[String],
    who: &LogFor<'_>,
) -> std::io::Result<(pipe::Sender, pipe::Sender)> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let child_fds: [(OwnedFd, i32); 3] = [(out_r, 3), (err_r, 4), (ready_w, 5)];
    let raw: Vec<(i32, i32)> = child_fds
        .iter()
        .map(|(fd, n)| (fd.as_raw_fd(), *n))
        .collect();
    let mut cmd = std::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", who.container)
        .env("CONTAINER_NAMESPACE", who.namespace)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls dup2 and
    // fcntl and close, which are async-signal-safe; `raw` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Each source first goes above 5, so that placing one cannot clobber another.
            let mut high = Vec::with_capacity(raw.len());
            for (fd, _) in &raw {
                let moved = libc::fcntl(*fd, libc::F_DUPFD, 10);
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high.push(moved);
            }
            for (moved, (_, target)) in high.iter().zip(&raw) {
                if libc::dup2(*moved, *target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(*moved);
            }
            Ok(())
        });
    }
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("starting the logger {}: {e}", path.display()),
            )
        })?;
    // Our copies of the child's ends: the logger's EOF on fd 5 must come from it alone.
    drop(child_fds);
    let mut ready = pipe::Receiver::from_owned_fd(ready_r)?;
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(LOGGER_READY_TIMEOUT, async {
        loop {
            match ready.read(&mut byte).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    if waited.is_err() {
        let _ = child.start_kill();
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the logger {} did not close fd 5 (its ready signal) within {} s",
                path.display(),
                LOGGER_READY_TIMEOUT.as_secs()
            ),
        ));
    }
    // Reap it whenever it ends.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok((
        pipe::Sender::from_owned_fd(out_w)?,
        pipe::Sender::from_owned_fd(err_w)?,
    ))
}

fn open_sink(sink: &Sink) -> std::io::Result<Box<dyn AsyncWrite + Send + Unpin>> {
    Ok(match sink {
        // Read-write: opening never fails or waits for lack of a reader, and a reader that
        // goes away stalls the copy instead of losing the stream.
        Sink::Fifo(path) => Box::new(
            pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(path)?,
        ),
        Sink::File(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            Box::new(tokio::fs::File::from_std(file))
        }
        Sink::Binary { path, .. } => {
            return Err(std::io::Error::other(format!(
                "the logger {} takes both streams at once",
                path.display()
            )))
        }
    })
}

async fn copy_out(mut from: impl AsyncRead + Unpin, mut to: Box<dyn AsyncWrite + Send + Unpin>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.flush().await;
}

async fn copy_stdin(mut from: pipe::Receiver, mut to: tokio::net::UnixStream, closed: Arc<Notify>) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut closing = false;
    loop {
        let read = if closing {
            match tokio::time::timeout(STDIN_DRAIN, from.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = from.read(&mut buf) => r,
                _ = closed.notified() => { closing = true; continue; }
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    // EOF for the process.
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_log_uris_give_the_logger_and_its_arguments() {
        match sink("binary:///usr/bin/my%20logger?--dir=/var/log/x&verbose").unwrap() {
            Some(Sink::Binary { path, args }) => {
                assert_eq!(path, PathBuf::from("/usr/bin/my logger"));
                assert_eq!(args, vec!["--dir", "/var/log/x", "verbose"]);
            }
            _ => panic!("not a binary sink"),
        }
        assert!(sink("binary://relative/logger").is_err());
        assert!(sink("binary:///bad%zzescape").is_err());
        let both = |out: &str, err: &str| StdioPaths {
            stdout: out.into(),
            stderr: err.into(),
            ..Default::default()
        };
        assert!(both("binary:///l", "binary:///l").check().is_ok());
        assert!(both("binary:///l", "").check().is_ok());
        assert!(both("binary:///l", "/run/fifo").check().is_err());
    }
}

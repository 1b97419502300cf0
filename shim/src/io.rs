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
}

impl StdioPaths {
    /// Refuse what this shim cannot serve, before anything is created.
    pub fn check(&self) -> Result<(), String> {
        for uri in [&self.stdout, &self.stderr] {
            sink(uri)?;
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
    if uri.starts_with("binary://") {
        return Err(format!(
            "log URI {uri:?}: binary:// loggers are not supported by containerd-shim-brig-v2 yet; \
             use FIFOs (the default) or file://"
        ));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        return Err(format!(
            "log URI {uri:?}: unknown scheme {scheme:?}; use FIFOs or file://"
        ));
    }
    Ok(Some(Sink::Fifo(uri.into())))
}

/// The copying of one process's stdio.
pub struct Relay {
    outputs: Vec<JoinHandle<()>>,
    close_stdin: Arc<Notify>,
}

impl Relay {
    /// Start copying between `paths` and the process's `stdio`.
    pub fn start(paths: &StdioPaths, stdio: Stdio) -> std::io::Result<Self> {
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

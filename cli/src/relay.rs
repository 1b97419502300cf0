//! Copying between the user's terminal/pipes and a process's stdio streams.

use std::os::fd::AsFd;

use brig_runtime::container::Stdio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Puts the user's terminal in raw mode while alive (for `-t`), restoring it on drop.
pub struct RawTerminal {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; otherwise nothing.
    pub fn enter() -> Self {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(stdin.as_fd()) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        if tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// The user's terminal size, if stdout or stdin is a terminal.
pub fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    for fd in [1, 0] {
        // SAFETY: TIOCGWINSZ writes one `winsize` into the valid, exclusively borrowed `ws`.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if rc == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

/// Copy the user's stdin to the process (then end its stdin) and its output to the user's
/// stdout/stderr, until both outputs end. Stdin keeps being copied in the background.
/// With `logs`, the output is also kept in `stdout.log`/`stderr.log` there (`brig logs`).
pub async fn relay(stdio: Stdio, logs: Option<&std::path::Path>) {
    let Stdio {
        stdin,
        stdout,
        stderr,
    } = stdio;
    if let Some(mut to_process) = stdin {
        tokio::spawn(async move {
            let mut user = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match user.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to_process.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = to_process.shutdown().await;
        });
    }
    let (out_log, err_log) = match logs {
        Some(dir) => (
            open_log(&dir.join("stdout.log")).await,
            open_log(&dir.join("stderr.log")).await,
        ),
        None => (None, None),
    };
    let out = tokio::spawn(copy_out(stdout, tokio::io::stdout(), out_log));
    let err = tokio::spawn(copy_out(stderr, tokio::io::stderr(), err_log));
    let _ = out.await;
    let _ = err.await;
}

async fn open_log(path: &std::path::Path) -> Option<tokio::fs::File> {
    match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(
                "cannot keep the container's output in {}: {e}",
                path.display()
            );
            None
        }
    }
}

/// Copy one output stream to the user, and to its log if there is one. The user comes
/// first: a log that fails to write stops being written, the user's copy goes on.
async fn copy_out<R, W>(stream: Option<R>, mut user: W, mut log: Option<tokio::fs::File>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let Some(mut stream) = stream else { return };
    let mut buf = vec![0u8; 64 * 1024];
    let mut user_ok = true;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Keep draining after the user's side closed, so the process never blocks on output.
        if user_ok && (user.write_all(&buf[..n]).await.is_err() || user.flush().await.is_err()) {
            user_ok = false;
        }
        if let Some(f) = &mut log {
            if f.write_all(&buf[..n]).await.is_err() {
                log = None;
            }
        }
    }
    let _ = user.flush().await;
    if let Some(f) = &mut log {
        let _ = f.flush().await;
    }
}

/// Point this process's stdin/stdout/stderr at /dev/null (a detached `brig` must not die
/// when the terminal or pipe it was started from goes away).
pub fn detach_stdio() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors from a valid, open descriptor.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// Copy a detached container's output into `dir/stdout.log` and `dir/stderr.log`.
pub async fn to_logs(stdio: Stdio, dir: &std::path::Path) {
    let Stdio { stdout, stderr, .. } = stdio;
    let (out_log, err_log) = (
        open_log(&dir.join("stdout.log")).await,
        open_log(&dir.join("stderr.log")).await,
    );
    let out = tokio::spawn(copy_out(stdout, tokio::io::sink(), out_log));
    let err = tokio::spawn(copy_out(stderr, tokio::io::sink(), err_log));
    let _ = out.await;
    let _ = err.await;
}

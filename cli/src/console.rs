//! `--console-socket`: the OCI runtime CLI's way of handing a container's terminal to the
//! engine, as runc does it. The terminal is a host PTY: its master goes to the engine (conmon)
//! over the socket with SCM_RIGHTS; its slave becomes this process's stdin, stdout and
//! controlling terminal, so the relay that serves `brig run -t` serves it too. Window-size
//! changes the engine makes on the master reach us as SIGWINCH and go on to the guest.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// runc's rules for a terminal and a console socket, for `create` (which always leaves a
/// keeper behind) and `exec --detach`: the terminal must go somewhere, and a socket without a
/// terminal is a mistake.
pub fn check(terminal: bool, console_socket: Option<&Path>, detached: bool) -> anyhow::Result<()> {
    match (terminal, console_socket) {
        (true, None) if detached => anyhow::bail!(
            "process.terminal is true but no --console-socket was given: a detached process's \
             terminal must be sent somewhere (pass --console-socket, or set terminal to false)"
        ),
        (false, Some(socket)) => anyhow::bail!(
            "--console-socket {} was given but process.terminal is false: set terminal to \
             true, or drop the option",
            socket.display()
        ),
        _ => Ok(()),
    }
}

/// Make a PTY, send its master to the engine listening on `socket`, and make its slave our
/// stdin, stdout and (when we lead a session, as keepers do) controlling terminal.
pub fn take_terminal(socket: &Path) -> anyhow::Result<()> {
    let pty = nix::pty::openpty(None, None).context("opening a pseudo-terminal")?;
    let name = nix::unistd::ttyname(&pty.slave).context("naming the pseudo-terminal")?;
    send_master(socket, &pty.master, name.as_os_str().as_encoded_bytes()).with_context(|| {
        format!(
            "sending the terminal to --console-socket {}",
            socket.display()
        )
    })?;
    drop(pty.master);
    // A session leader without a terminal (a keeper) takes this one: the engine's resizes
    // then reach it as SIGWINCH, and its hangup as SIGHUP (forwarded to the container).
    // SAFETY: TIOCSCTTY takes an integer argument and touches no memory of ours.
    let _ = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    for target in [0, 1] {
        // SAFETY: replaces descriptor 0 or 1, which std's stdin/stdout do not own as Rust
        // objects (they are only ever used through the raw numbers); the slave stays open.
        if unsafe { libc::dup2(pty.slave.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("making the terminal descriptor {target}"));
        }
    }
    Ok(())
}

/// Send `master` over a connection to `socket`, with `name` as the message (runc sends the
/// terminal's path; engines take the descriptor).
fn send_master(socket: &Path, master: &OwnedFd, name: &[u8]) -> anyhow::Result<()> {
    let stream = UnixStream::connect(socket).context("connecting")?;
    let fds = [master.as_raw_fd()];
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(name)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("sendmsg")?;
    anyhow::ensure!(sent == name.len(), "sent {sent} of {} bytes", name.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{recvmsg, ControlMessageOwned};

    #[test]
    fn the_master_arrives_over_the_socket_and_talks_to_the_slave() {
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("brig-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        let name = nix::unistd::ttyname(&pty.slave).unwrap();
        send_master(&path, &pty.master, name.as_os_str().as_encoded_bytes()).unwrap();
        drop(pty.master);

        let (conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 256];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let mut received = None;
        for cmsg in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                received = fds.first().copied();
            }
        }
        let len = msg.bytes;
        assert_eq!(&buf[..len], name.as_os_str().as_encoded_bytes());
        // SAFETY: the descriptor just arrived with SCM_RIGHTS and is ours alone.
        let mut master = std::fs::File::from(unsafe {
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(received.unwrap())
        });
        let mut slave = std::fs::File::from(pty.slave);
        let mut raw = nix::sys::termios::tcgetattr(&slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut raw);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &raw).unwrap();
        master.write_all(b"typed").unwrap();
        let mut got = [0u8; 5];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"typed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn terminal_and_socket_go_together() {
        let sock = Path::new("/run/x.sock");
        assert!(check(true, None, true)
            .unwrap_err()
            .to_string()
            .contains("--console-socket"));
        assert!(check(false, Some(sock), true)
            .unwrap_err()
            .to_string()
            .contains("terminal is false"));
        check(true, Some(sock), true).unwrap();
        check(true, None, false).unwrap();
        check(false, None, true).unwrap();
    }
}

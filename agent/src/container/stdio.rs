//! A container process's stdio: pipes or a pty on the process side, one guest-initiated
//! connection per stream on the host side, and threads that pump between them.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use brig_protocols::agent::StdioPorts;
use nix::fcntl::OFlag;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

use super::ContainerError;
use crate::vsock_self_test::{Target, HOST_CID};

/// Bytes moved per read.
const CHUNK: usize = 32 * 1024;

/// The process side of the streams, to become its fds 0, 1 and 2.
pub struct ChildStdio {
    /// stdin, stdout, stderr (/dev/null for a terminal: the process replaces them with the
    /// pty slave it opens itself).
    pub fds: [OwnedFd; 3],
    /// Terminal only: the process's end of the console socket. The process opens a pty in
    /// the container's own devpts and sends the master back over it (SCM_RIGHTS), like
    /// runc's --console-socket.
    pub console_socket: Option<OwnedFd>,
}

/// A terminal whose master the process has not sent yet.
struct PendingTerminal {
    /// The agent's end of the console socket.
    socket: OwnedFd,
    stdin_socket: Option<OwnedFd>,
    stdout_socket: Option<OwnedFd>,
    name: String,
}

/// The agent side of a process's streams.
pub struct StdioHandles {
    /// The stdin connection, to end it on CloseStdin.
    stdin_socket: Mutex<Option<OwnedFd>>,
    /// The pty master (terminal only), for ResizeTty.
    tty_master: Option<Arc<OwnedFd>>,
    /// Threads copying output to the host; finished = output flushed.
    output_pumps: Vec<JoinHandle<()>>,
    /// Terminal only, until [`StdioHandles::receive_terminal`].
    pending_terminal: Option<PendingTerminal>,
}

impl StdioHandles {
    /// Terminal only: receives the pty master from the process (sent before it reported
    /// ready) and starts relaying it: output to the stdout stream, the stdin stream into it.
    /// Must be called before the process is followed (the output pump is joined on exit).
    pub fn receive_terminal(&mut self) -> Result<(), ContainerError> {
        let Some(pending) = self.pending_terminal.take() else {
            return Ok(());
        };
        let io_error = |what: &str, err: &dyn std::fmt::Display| {
            ContainerError::Internal(format!("cannot set up the terminal ({what}): {err}"))
        };
        let master = receive_fd(&pending.socket).map_err(|err| io_error("receive", &err))?;
        let master = Arc::new(master);
        if let Some(socket) = pending.stdin_socket {
            let to = dup_file(&master).map_err(|err| io_error("dup", &err))?;
            let from = File::from(dup(&socket).map_err(|err| io_error("dup", &err))?);
            *self
                .stdin_socket
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(socket);
            spawn_pump(
                format!("{}-stdin", pending.name),
                from,
                to,
                PumpEnd::TerminalInput,
            )?;
        }
        let out = match pending.stdout_socket {
            Some(socket) => File::from(socket),
            None => open_null(true).map_err(|err| io_error("/dev/null", &err))?,
        };
        let from = dup_file(&master).map_err(|err| io_error("dup", &err))?;
        self.output_pumps.push(spawn_pump(
            format!("{}-tty", pending.name),
            from,
            out,
            PumpEnd::Socket,
        )?);
        self.tty_master = Some(master);
        Ok(())
    }

    /// The output pump threads, for the exit follower to join.
    pub fn take_output_pumps(&mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.output_pumps)
    }

    /// Ends the process's stdin (as if the host had closed it).
    pub fn close_stdin(&self) {
        let socket = self
            .stdin_socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(socket) = socket {
            // The pump's read returns 0 and it closes the process's end.
            let _ = socket::shutdown(socket.as_raw_fd(), socket::Shutdown::Read);
        }
    }

    /// Sets the terminal size.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ContainerError> {
        let master = self.tty_master.as_ref().ok_or_else(|| {
            ContainerError::FailedPrecondition("the process has no terminal".into())
        })?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from the valid pointer; the fd is open.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(ContainerError::Internal(format!(
                "cannot resize the terminal: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

/// Connects the streams named in `ports` and starts pumping; returns both sides.
pub fn setup(
    target: &Target,
    ports: &StdioPorts,
    terminal: bool,
    name: &str,
) -> Result<(ChildStdio, StdioHandles), ContainerError> {
    let token = ports.token.as_slice();
    let stdin_socket = connect_port(target, ports.stdin, token)?;
    let stdout_socket = connect_port(target, ports.stdout, token)?;
    let stderr_socket = if terminal {
        None
    } else {
        connect_port(target, ports.stderr, token)?
    };
    let io_error = |what: &str, err: &dyn std::fmt::Display| {
        ContainerError::Internal(format!("cannot set up stdio ({what}): {err}"))
    };
    let mut handles = StdioHandles {
        stdin_socket: Mutex::new(None),
        tty_master: None,
        output_pumps: Vec::new(),
        pending_terminal: None,
    };

    if terminal {
        let (agent_end, process_end) = socket::socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|err| io_error("socketpair", &err))?;
        handles.pending_terminal = Some(PendingTerminal {
            socket: agent_end,
            stdin_socket,
            stdout_socket,
            name: name.to_string(),
        });
        let null = |write| {
            open_null(write)
                .map(OwnedFd::from)
                .map_err(|err| io_error("/dev/null", &err))
        };
        return Ok((
            ChildStdio {
                fds: [null(false)?, null(true)?, null(true)?],
                console_socket: Some(process_end),
            },
            handles,
        ));
    }

    let stdin = match stdin_socket {
        Some(socket) => {
            let (read, write) =
                nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| io_error("pipe", &err))?;
            let from = File::from(dup(&socket).map_err(|err| io_error("dup", &err))?);
            *handles
                .stdin_socket
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(socket);
            spawn_pump(
                format!("{name}-stdin"),
                from,
                File::from(write),
                PumpEnd::Close,
            )?;
            read
        }
        None => OwnedFd::from(open_null(false).map_err(|err| io_error("/dev/null", &err))?),
    };
    let mut output = |socket: Option<OwnedFd>, stream: &str| -> Result<OwnedFd, ContainerError> {
        match socket {
            Some(socket) => {
                let (read, write) =
                    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|err| io_error("pipe", &err))?;
                handles.output_pumps.push(spawn_pump(
                    format!("{name}-{stream}"),
                    File::from(read),
                    File::from(socket),
                    PumpEnd::Socket,
                )?);
                Ok(write)
            }
            None => Ok(OwnedFd::from(
                open_null(true).map_err(|err| io_error("/dev/null", &err))?,
            )),
        }
    };
    let stdout = output(stdout_socket, "stdout")?;
    let stderr = output(stderr_socket, "stderr")?;
    Ok((
        ChildStdio {
            fds: [stdin, stdout, stderr],
            console_socket: None,
        },
        handles,
    ))
}

/// What a pump does when its source ends.
#[derive(Clone, Copy)]
enum PumpEnd {
    /// Shut down the write side of the destination socket (output streams).
    Socket,
    /// Close the destination (stdin pipe).
    Close,
    /// Send EOF (^D) to the terminal, then stop.
    TerminalInput,
}

fn spawn_pump(
    name: String,
    mut from: File,
    mut to: File,
    end: PumpEnd,
) -> Result<JoinHandle<()>, ContainerError> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    // EIO: the pty's slave side is closed everywhere (terminal output ends).
                    Err(_) => break,
                }
            }
            match end {
                PumpEnd::Socket => {
                    let _ = socket::shutdown(to.as_raw_fd(), socket::Shutdown::Write);
                }
                PumpEnd::TerminalInput => {
                    let _ = to.write_all(&[4]);
                }
                PumpEnd::Close => {}
            }
        })
        .map_err(|err| ContainerError::Internal(format!("cannot start a stdio thread: {err}")))
}

/// The longest stdio token the host may send.
const MAX_TOKEN: usize = 64;

/// Opens a guest-initiated connection to the host for one stream; port 0 = none. The
/// host's `token` goes first on it: the host keeps only connections that present it.
fn connect_port(
    target: &Target,
    port: u32,
    token: &[u8],
) -> Result<Option<OwnedFd>, ContainerError> {
    if port == 0 {
        return Ok(None);
    }
    if token.len() > MAX_TOKEN {
        return Err(ContainerError::InvalidArgument(format!(
            "stdio token of {} bytes (at most {MAX_TOKEN})",
            token.len()
        )));
    }
    let connected = match target {
        Target::HostVsock => connect_vsock(port).map_err(|err| (format!("vsock port {port}"), err)),
        Target::UnixPrefix(prefix) => {
            let path = format!("{prefix}_{port}");
            UnixStream::connect(&path)
                .map(OwnedFd::from)
                .map_err(|err| (path, err))
        }
    };
    let connected = connected.and_then(|fd| {
        let mut stream = File::from(fd);
        stream
            .write_all(token)
            .map(|()| OwnedFd::from(stream))
            .map_err(|err| (format!("port {port} (sending its token)"), err))
    });
    connected.map(Some).map_err(|(what, err)| {
        ContainerError::Unavailable(format!(
            "cannot connect the stdio stream to the host at {what}: {err} (the host must \
             listen before the call)"
        ))
    })
}

fn connect_vsock(port: u32) -> io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, port))?;
    Ok(fd)
}

fn open_null(write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    fd.try_clone()
}

fn dup_file(fd: &OwnedFd) -> io::Result<File> {
    fd.try_clone().map(File::from)
}

/// Receives one fd sent with SCM_RIGHTS on `socket` (close-on-exec).
fn receive_fd(socket: &OwnedFd) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this fd in our table; nothing else owns it.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                if received.is_none() {
                    received = Some(fd);
                }
            }
        }
    }
    received.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the process closed the console socket without sending the pty master",
        )
    })
}

//! Network helpers of the end-to-end tests: an HTTP client and server on the host, and a
//! network namespace wired to the host by a veth pair, as someone other than Brig makes one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// GET http://ADDR/ until it answers 200 or `within` passes; the body.
pub fn http_get(addr: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut last;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let sock = addr
                .parse()
                .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
            let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut response = String::new();
            s.read_to_string(&mut response)?;
            Ok(response)
        })();
        match attempt {
            Ok(r) if r.starts_with("HTTP/1.") && r.contains(" 200 ") => {
                return r
                    .split("\r\n\r\n")
                    .nth(1)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
            }
            Ok(r) => last = format!("answer {r:?}"),
            Err(e) => last = e.to_string(),
        }
        assert!(Instant::now() < deadline, "GET http://{addr}/: {last}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// An HTTP server on the host at `ip` answering `body` to every request; its port.
pub fn host_server(ip: &str, body: &'static str) -> u16 {
    let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// A network namespace `/run/netns/NAME` whose `eth0` has `.2` of the /24 `prefix` (e.g.
/// "10.99.7"), wired by a veth pair to the host, which has `.1`. Removed when dropped.
pub struct VethNetns {
    pub name: String,
    peer: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl VethNetns {
    pub fn new(name: &str, prefix: &str) -> Self {
        // The host's end gets a short unique name (IFNAMSIZ is 16).
        let peer = format!("bv{}{}", std::process::id() % 100_000, name.len() % 10);
        ip(&["netns", "add", name]);
        let me = Self {
            name: name.to_string(),
            peer: peer.clone(),
        };
        ip(&[
            "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns", name,
        ]);
        ip(&["addr", "add", &format!("{prefix}.1/24"), "dev", &peer]);
        ip(&["link", "set", &peer, "up"]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{prefix}.2/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", name, "link", "set", "eth0", "up"]);
        me
    }

    /// `--network` for it.
    pub fn network_arg(&self) -> String {
        format!("netns:/run/netns/{}", self.name)
    }
}

impl Drop for VethNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        // Usually gone already: deleting the namespace deletes the pair.
        let _ = Command::new("ip")
            .args(["link", "del", &self.peer])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

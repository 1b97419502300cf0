//! Images for the `brig pull` / `brig run IMAGE` tests: a real registry on loopback
//! (Debian's `docker-registry`, the CNCF distribution), images built by real tools (`umoci`)
//! or, for the hostile ones no real tool would write, by `tests/fixtures/oci-layout.py`, and
//! `skopeo` to push and inspect them.
//!
//! Build images under [`std::env::temp_dir`] (a [`crate::scratch`] directory): in the lab
//! /tmp is tmpfs, while the root is 9p, where umoci records bogus hard links in the layers.
//! These are test helpers: every failure is a panic that says what failed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::{busybox_rootfs, stdout_of, text};

/// How long a registry may take to answer its first request (the lab is slow).
const REGISTRY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The uid and gid of the user `app` that [`test_image`] runs as.
pub const APP_ID: u32 = 1234;

/// A `docker-registry serve` on 127.0.0.1, storing on the filesystem, over plain HTTP (so
/// clients need their "TLS verify off" / insecure-registry switch). Killed when dropped.
pub struct Registry {
    /// Where it listens: "127.0.0.1:PORT", what image references start with.
    pub addr: String,
    /// Its storage root: blobs are under `docker/registry/v2/blobs`, see [`Registry::blob_path`].
    pub storage: PathBuf,
    process: Child,
}

impl Registry {
    /// Starts a registry with its config (`registry.yml`), log (`registry.log`) and storage
    /// (`registry/`) in `dir`, on a free port, and waits until `GET /v2/` answers.
    pub fn start(dir: &Path) -> Registry {
        Self::start_with(dir, None)
    }

    /// [`Registry::start`] with HTTP basic authentication: only `user`:`password` may pull
    /// or push (docker-registry's htpasswd auth, bcrypt hashes made with python3's crypt).
    pub fn start_with_basic_auth(dir: &Path, user: &str, password: &str) -> Registry {
        Self::start_with(dir, Some((user, password)))
    }

    fn start_with(dir: &Path, basic_auth: Option<(&str, &str)>) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        // A port the kernel just handed out and nobody holds: the registry binds it next.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port on 127.0.0.1")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.join("registry");
        let config = dir.join("registry.yml");
        // Level error is the quietest there is; it still logs each 404, such as skopeo's
        // "is this blob there yet" probes, hence a log file rather than the test's output.
        std::fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n{}",
                storage.display(),
                basic_auth
                    .map(|a| htpasswd_auth(dir, a))
                    .unwrap_or_default()
            ),
        )
        .unwrap();
        let log_path = dir.join("registry.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let process = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("/usr/bin/docker-registry (apt-get install docker-registry)");
        let mut registry = Registry {
            addr,
            storage,
            process,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = registry.process.try_wait().unwrap() {
                panic!(
                    "docker-registry on {} exited at start ({status}); its log:\n{}",
                    registry.addr,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if registry.answers() {
                return registry;
            }
            if started.elapsed() > REGISTRY_START_TIMEOUT {
                panic!(
                    "docker-registry on {} did not answer GET /v2/ within {:?}; its log:\n{}",
                    registry.addr,
                    REGISTRY_START_TIMEOUT,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether `GET /v2/` gets a 200 from a registry (its API version header, not just any
    /// server that happens to hold the port).
    fn answers(&self) -> bool {
        let Ok(mut conn) = TcpStream::connect(&self.addr) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let request = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let mut reply = Vec::new();
        if conn.write_all(request.as_bytes()).is_err() || conn.read_to_end(&mut reply).is_err() {
            return false;
        }
        let reply = text(&reply).to_ascii_lowercase();
        let status = reply.lines().next().unwrap_or("");
        // 401: it answers, and wants the credentials.
        status.starts_with("http/1.")
            && (status.contains(" 200") || status.contains(" 401"))
            && reply.contains("docker-distribution-api-version: registry/2.0")
    }

    /// Where the registry keeps the blob `digest` ("sha256:HEX" or just HEX): overwrite it
    /// to serve a corrupt layer or config.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        assert!(
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
            "blob_path: {digest:?} is not a sha256 digest"
        );
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// The `auth:` section of a registry config for one htpasswd user, its file written in `dir`.
fn htpasswd_auth(dir: &Path, (user, password): (&str, &str)) -> String {
    let out = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt, sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))",
            password,
        ])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "bcrypt with python3: {}",
        text(&out.stderr)
    );
    let file = dir.join("htpasswd");
    std::fs::write(&file, format!("{user}:{}", text(&out.stdout))).unwrap();
    format!(
        "auth:\n  htpasswd:\n    realm: brig-e2e\n    path: {}\n",
        file.display()
    )
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `skopeo` kept off the machine's container configuration: no trust policy
/// (`--insecure-policy`: /etc/containers/policy.json may be missing or strict) and no
/// registries.conf (our references name their registry). Callers add `--no-creds` (or
/// `--dest-no-creds`) so that no auth file is read. Root's skopeo still keeps its blob-info
/// cache in /var/lib/containers/cache; nothing turns that off.
pub fn skopeo() -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.arg("--insecure-policy")
        .env("CONTAINERS_REGISTRIES_CONF", "/dev/null")
        .stdin(Stdio::null());
    cmd
}

/// Pushes the image tagged `tag` in the OCI layout `oci_layout` to `dest`, a reference
/// without scheme such as "127.0.0.1:PORT/test/app:1.0", over plain HTTP.
pub fn push(oci_layout: &Path, tag: &str, dest: &str) {
    push_as(oci_layout, tag, dest, None)
}

/// [`push`] with `USER:PASSWORD` for a registry that wants them.
pub fn push_as(oci_layout: &Path, tag: &str, dest: &str, creds: Option<&str>) {
    let creds = match creds {
        Some(c) => format!("--dest-creds={c}"),
        None => "--dest-no-creds".to_string(),
    };
    let out = skopeo()
        .args(["copy", &creds, "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", oci_layout.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .expect("skopeo (apt-get install skopeo)");
    stdout_of(
        out,
        &format!("skopeo copy {}:{tag} to {dest}", oci_layout.display()),
    );
}

/// `skopeo inspect` of the image `reference` ("127.0.0.1:PORT/NAME:TAG") over plain HTTP,
/// with `flags` such as `--config` (the image config) or `--raw` (the manifest), as JSON.
pub fn inspect(reference: &str, flags: &[&str]) -> serde_json::Value {
    let out = skopeo()
        .args(["inspect", "--no-creds", "--tls-verify=false"])
        .args(flags)
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo (apt-get install skopeo)");
    let json = stdout_of(out, &format!("skopeo inspect {flags:?} {reference}"));
    serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("skopeo inspect {reference}: not JSON ({e}): {json}"))
}

/// Runs `umoci ARGS`, which must succeed.
fn umoci(args: &[&str]) {
    let out = Command::new("umoci")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("umoci (apt-get install umoci)");
    stdout_of(out, &format!("umoci {}", args.join(" ")));
}

/// Adds one layer to `image` ("LAYOUT:TAG") the way an image author does: unpack it to a
/// bundle, let `change` edit the root filesystem, repack (umoci diffs the tree against what
/// it unpacked, so a deleted path becomes a whiteout).
fn umoci_layer(image: &str, bundle: &Path, change: impl FnOnce(&Path)) {
    let _ = std::fs::remove_dir_all(bundle);
    let bundle_arg = bundle.to_str().expect("a UTF-8 path");
    umoci(&["unpack", "--image", image, bundle_arg]);
    change(&bundle.join("rootfs"));
    umoci(&["repack", "--image", image, bundle_arg]);
    std::fs::remove_dir_all(bundle).unwrap();
}

/// Writes `content` to `path` and gives it to the user `app`.
fn app_file(path: &Path, content: &str) {
    std::fs::write(path, content).unwrap();
    chown(path, Some(APP_ID), Some(APP_ID)).unwrap();
}

/// Creates the directory `path` and gives it to the user `app`.
fn app_dir(path: &Path) {
    std::fs::create_dir_all(path).unwrap();
    chown(path, Some(APP_ID), Some(APP_ID)).unwrap();
}

/// Appends `line` to the file `path`.
fn append(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all(line.as_bytes()).unwrap();
}

/// The image the `brig run IMAGE` tests run: an OCI layout at `dir/layout`, tag `latest`,
/// built by umoci (needs root) once per `dir`, with three gzip layers:
///
/// 1. the busybox root filesystem of [`busybox_rootfs`];
/// 2. user and group `app` (uid and gid [`APP_ID`], home /data) in /etc/passwd and
///    /etc/group, and /data owned by app with `keep.txt` ("kept\n"), `gone.txt`
///    ("should be deleted\n") and `opaque/old.txt` ("old\n");
/// 3. `gone.txt` deleted, `opaque/` deleted and made anew with only `new.txt` ("new\n"),
///    and `top.txt` ("top\n") added, all app's.
///
/// umoci 0.4.7 writes layer 3 with plain whiteouts only, no opaque marker
/// (`.wh..wh..opq`) for the re-created directory:
///
/// ```text
/// data/                      1234/1234
/// data/.wh.gone.txt          0/0  mode 0
/// data/opaque/               1234/1234
/// data/opaque/new.txt        1234/1234
/// data/opaque/.wh.old.txt    0/0  mode 0   (after new.txt)
/// data/top.txt               1234/1234
/// ```
///
/// So the result is /data with keep.txt, top.txt and opaque/new.txt only.
/// (`tests/fixtures/oci-layout.py` writes an opaque marker where a test needs one.)
///
/// The config: Entrypoint `["/bin/sh", "-c"]`, Cmd `["echo \"$GREETING\"; id -u; pwd"]`,
/// Env `PATH=/usr/sbin:/usr/bin:/sbin:/bin` and `GREETING=hello from the image`, WorkingDir
/// /data, User app; so running it prints "hello from the image", "1234", "/data".
pub fn test_image(dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    if layout.join("index.json").exists() {
        return layout;
    }
    let rootfs = busybox_rootfs(dir);
    // Built beside and renamed into place, so that a half-built image is never taken.
    let work = dir.join("layout.build");
    let bundle = dir.join("layout.bundle");
    let _ = std::fs::remove_dir_all(&work);
    let work_arg = work.to_str().expect("a UTF-8 path");
    assert!(
        !work_arg.contains(':'),
        "umoci takes LAYOUT:TAG, so {work_arg} may not contain ':'"
    );
    let image = format!("{work_arg}:latest");
    umoci(&["init", "--layout", work_arg]);
    umoci(&["new", "--image", &image]);

    umoci_layer(&image, &bundle, |root| {
        let mut from = rootfs.clone().into_os_string();
        from.push("/.");
        let out = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(root)
            .output()
            .unwrap();
        stdout_of(out, "cp -a busybox rootfs");
    });

    umoci_layer(&image, &bundle, |root| {
        append(
            &root.join("etc/passwd"),
            "app:x:1234:1234:app:/data:/bin/sh\n",
        );
        append(&root.join("etc/group"), "app:x:1234:\n");
        app_dir(&root.join("data"));
        app_file(&root.join("data/keep.txt"), "kept\n");
        app_file(&root.join("data/gone.txt"), "should be deleted\n");
        app_dir(&root.join("data/opaque"));
        app_file(&root.join("data/opaque/old.txt"), "old\n");
    });

    umoci_layer(&image, &bundle, |root| {
        std::fs::remove_file(root.join("data/gone.txt")).unwrap();
        std::fs::remove_dir_all(root.join("data/opaque")).unwrap();
        app_dir(&root.join("data/opaque"));
        app_file(&root.join("data/opaque/new.txt"), "new\n");
        app_file(&root.join("data/top.txt"), "top\n");
        // umoci compares mtimes in whole seconds (what a tar header holds), so a directory
        // changed within the second it was unpacked in would get no entry in the layer.
        // Dated apart, both directories always have one, as in a layer Docker builds.
        for d in ["data", "data/opaque"] {
            let when = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
            std::fs::File::open(root.join(d))
                .and_then(|f| f.set_modified(when))
                .unwrap();
        }
    });

    umoci(&[
        "config",
        "--image",
        &image,
        "--config.entrypoint=/bin/sh",
        "--config.entrypoint=-c",
        "--config.cmd=echo \"$GREETING\"; id -u; pwd",
        "--config.env=PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.env=GREETING=hello from the image",
        "--config.workingdir=/data",
        "--config.user=app",
    ]);
    std::fs::rename(&work, &layout).unwrap();
    layout
}

/// Writes the OCI layout `out` (replacing it) from `spec`, by `tests/fixtures/oci-layout.py`
/// (see there for the spec: a config, and layers of a directory tree and/or tar entries
/// written verbatim, such as names with "..", in the order given). The spec is kept beside
/// it as `out.json`.
pub fn oci_layout(out: &Path, spec: &serde_json::Value) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/oci-layout.py");
    let mut spec_path = out.to_path_buf().into_os_string();
    spec_path.push(".json");
    std::fs::write(&spec_path, spec.to_string()).unwrap();
    let out_cmd = Command::new("python3")
        .arg(script)
        .arg(&spec_path)
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    stdout_of(out_cmd, &format!("oci-layout.py for {}", out.display()));
}

/// A one-layer image whose layer has [`busybox_rootfs`] and a config of PATH and Cmd
/// `/bin/sh`, then `extra` (oci-layout.py tar entries), at `dir/name` (built once per dir).
fn busybox_plus(dir: &Path, name: &str, extra: serde_json::Value) -> PathBuf {
    let out = dir.join(name);
    if out.join("index.json").exists() {
        return out;
    }
    let rootfs = busybox_rootfs(dir);
    let spec = serde_json::json!({
        "tag": "latest",
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"]},
        "layers": [{"dir": rootfs, "entries": extra}],
    });
    oci_layout(&out, &spec);
    out
}

/// An image (OCI layout, tag `latest`) whose one gzip layer holds [`busybox_rootfs`] and
/// then a regular file named exactly `entry` with content "escaped\n": for names such as
/// "../escape" or "/abs" that an unpacker must refuse. Built once per `dir` and `entry`,
/// at `dir/hostile-HEX` where HEX spells the bytes of `entry`.
pub fn hostile_layer_image(dir: &Path, entry: &str) -> PathBuf {
    let hex: String = entry.bytes().map(|b| format!("{b:02x}")).collect();
    busybox_plus(
        dir,
        &format!("hostile-{hex}"),
        serde_json::json!([{"name": entry, "type": "file", "content": "escaped\n"}]),
    )
}

/// An image (OCI layout, tag `latest`) whose one gzip layer holds [`busybox_rootfs`], then a
/// symlink `evil -> /tmp`, then a file `evil/brig-escape-marker` ("escaped\n"): an unpacker
/// that follows the symlink writes /tmp/brig-escape-marker outside the root. At
/// `dir/symlink-escape`, built once per `dir`.
pub fn symlink_escape_image(dir: &Path) -> PathBuf {
    busybox_plus(
        dir,
        "symlink-escape",
        serde_json::json!([
            {"name": "evil", "type": "symlink", "target": "/tmp"},
            {"name": "evil/brig-escape-marker", "type": "file", "content": "escaped\n"},
        ]),
    )
}

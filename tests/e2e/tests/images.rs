//! `brig run IMAGE`, `brig pull`, `brig images`, `brig rmi` against a real registry on
//! loopback (Debian's docker-registry) holding images pushed by skopeo: the image's layers
//! (with umoci's whiteouts) make the container's root, its config the defaults, a second run
//! downloads nothing, containers never see each other's writes; and bad input — a malformed
//! reference, an unknown image, an unreachable registry, a tampered blob, layers that try to
//! write outside their directory — is one line and exit 125 with the store left as it was.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use brig_e2e::registry::{self, Registry};
use brig_e2e::{brig, dir_entries, scratch, stdout_of, text};

/// `brig` with a test state root and an image store of its own (on a tmpfs in the lab:
/// overlayfs cannot use L1's 9p root for its upper layers).
fn brig_with_store(test: &str, store: &Path) -> Command {
    let mut cmd = brig(test);
    cmd.env("BRIG_IMAGE_ROOT", store).stdin(Stdio::null());
    cmd
}

fn brig_ok(cmd: &mut Command, what: &str) -> String {
    stdout_of(cmd.output().unwrap(), what)
}

/// One line on stderr and Brig's own exit status.
fn assert_refused(out: &Output, what: &str, words: &str) {
    let stderr = text(&out.stderr);
    eprintln!("{what}: {}", stderr.trim_end());
    assert_eq!(out.status.code(), Some(125), "{what}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains(&words.to_lowercase()),
        "{what}: {words:?} in {stderr}"
    );
}

/// Overlay mounts under `dir`, as the host's mount table shows them.
fn mounts_under(dir: &Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.display().to_string();
    table
        .lines()
        .filter(|l| l.contains(&dir))
        .map(str::to_string)
        .collect()
}

#[test]
fn images_from_a_registry_run_with_their_layers_and_config() {
    let work = scratch("images-run");
    let store = work.join("store");
    let test = "images-run";
    let reg = Registry::start(&work.join("reg"));
    let layout = registry::test_image(&work);
    let image = format!("{}/test/app:1.0", reg.addr);
    registry::push(&layout, "latest", &image);
    let run = |args: &[&str]| {
        let mut cmd = brig_with_store(test, &store);
        cmd.args(["run", "--rm", "--network", "none", "--tls-verify=false"])
            .args(args);
        cmd
    };

    // The image's entrypoint, cmd, env, working directory and user (a name in its passwd).
    let out = brig_ok(&mut run(&[&image]), "brig run IMAGE");
    assert_eq!(out, "hello from the image\n1234\n/data\n");

    // Its layers: umoci's whiteouts hide the deleted file and the re-created directory's
    // old content; the rest of the lower layers shows through.
    let out = brig_ok(
        &mut run(&[&image, "ls /data /data/opaque; uname -r"]),
        "brig run IMAGE ls",
    );
    let listing: Vec<&str> = out.lines().collect();
    assert!(
        listing.contains(&"keep.txt") && listing.contains(&"top.txt"),
        "{out}"
    );
    assert!(
        !out.contains("gone.txt") && !out.contains("old.txt"),
        "{out}"
    );
    assert!(listing.contains(&"new.txt"), "{out}");
    let host_release = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_ne!(
        listing.last().copied(),
        Some(host_release.trim()),
        "runs in the guest kernel"
    );

    // -u and -e over the image's; --entrypoint replaces its entrypoint and drops its cmd.
    let out = brig_ok(
        &mut run(&[
            "-u",
            "0",
            "-e",
            "GREETING=over",
            &image,
            "echo $GREETING; id -u",
        ]),
        "brig run -u -e",
    );
    assert_eq!(out, "over\n0\n");
    let out = brig_ok(
        &mut run(&["--entrypoint", "/bin/pwd", &image]),
        "brig run --entrypoint",
    );
    assert_eq!(out, "/data\n");

    // Writes stay in the container's own layer: the next container and the image do not
    // see them.
    brig_ok(
        &mut run(&[&image, "echo changed > keep.txt; rm top.txt; cat keep.txt"]),
        "a container that writes",
    );
    let out = brig_ok(
        &mut run(&[&image, "cat keep.txt top.txt"]),
        "the next container",
    );
    assert_eq!(out, "kept\ntop\n");

    // A kept container keeps its layer until `brig rm`, and `rmi` refuses its image.
    brig_ok(
        brig_with_store(test, &store).args([
            "run",
            "--name",
            "kept",
            "--network",
            "none",
            "--tls-verify=false",
            &image,
            "true",
        ]),
        "a kept container",
    );
    assert_eq!(
        dir_entries(&store.join("containers")),
        vec!["kept".to_string()]
    );
    let out = brig_with_store(test, &store)
        .args(["rmi", &image])
        .output()
        .unwrap();
    assert_refused(&out, "rmi of an image in use", "brig rm kept");
    brig_ok(
        brig_with_store(test, &store).args(["rm", "kept"]),
        "brig rm",
    );
    assert_eq!(dir_entries(&store.join("containers")), Vec::<String>::new());
    assert_eq!(mounts_under(&store), Vec::<String>::new(), "overlays left");

    // A second run downloads nothing: it works with the registry gone.
    let images = brig_ok(brig_with_store(test, &store).arg("images"), "brig images");
    assert!(
        images.contains(&image) && images.contains(" 3 "),
        "{images}"
    );
    drop(reg);
    let out = brig_ok(
        &mut run(&[&image, "cat keep.txt"]),
        "run without the registry",
    );
    assert_eq!(out, "kept\n");

    // The same image from its OCI layout: the same blobs, so no layer is unpacked again.
    let layers_before = dir_entries(&store.join("layers"));
    let source = format!("oci:{}:latest", layout.display());
    let out = brig_ok(&mut run(&[&source, "cat top.txt"]), "brig run oci:DIR:TAG");
    assert_eq!(out, "top\n");
    assert_eq!(dir_entries(&store.join("layers")), layers_before);

    // rmi removes the images and then their layers.
    brig_ok(
        brig_with_store(test, &store).args(["rmi", &image, &source]),
        "brig rmi",
    );
    assert_eq!(dir_entries(&store.join("layers")), Vec::<String>::new());
    assert_eq!(dir_entries(&store.join("tmp")), Vec::<String>::new());
    for dir in ["containers", "sandboxes"] {
        let left = dir_entries(&PathBuf::from("/run/brig-e2e").join(test).join(dir));
        assert_eq!(left, Vec::<String>::new(), "state left in {dir}");
    }
}

#[test]
fn bad_images_are_one_line_and_leave_the_store_as_it_was() {
    let work = scratch("images-bad");
    let store = work.join("store");
    let test = "images-bad";
    let reg = Registry::start(&work.join("reg"));
    let layout = registry::test_image(&work);
    let good = format!("{}/test/app:1.0", reg.addr);
    registry::push(&layout, "latest", &good);
    let pull = |image: &str| {
        brig_with_store(test, &store)
            .args(["pull", "--tls-verify=false", image])
            .output()
            .unwrap()
    };

    // Two pulls at once share the work: both succeed, one copy of each layer.
    let mut both: Vec<_> = (0..2)
        .map(|_| {
            brig_with_store(test, &store)
                .args(["pull", "--tls-verify=false", &good])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in both.drain(..) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "concurrent pull: {}",
            text(&out.stderr)
        );
    }
    let store_before = (
        dir_entries(&store.join("layers")),
        std::fs::read(store.join("images.json")).unwrap(),
    );
    assert_eq!(store_before.0.len(), 3);

    assert_refused(
        &pull("Not An/Image"),
        "malformed reference",
        "is not an image reference",
    );
    assert_refused(
        &pull(&format!("{}/test/none:1", reg.addr)),
        "unknown image",
        "test/none",
    );
    assert_refused(
        &pull("127.0.0.1:1/test/app:1.0"),
        "unreachable registry",
        "refused",
    );
    let out = brig_with_store(test, &store)
        .args([
            "run",
            "--rm",
            "--pull",
            "never",
            "--network",
            "none",
            "busybox:none",
        ])
        .output()
        .unwrap();
    assert_refused(&out, "--pull never", "--pull=never");

    // A tampered blob: the registry serves other bytes than the manifest's digest names.
    let tampered = format!("{}/test/tampered:1", reg.addr);
    let hostile = registry::hostile_layer_image(&work, "harmless.txt");
    registry::push(&hostile, "latest", &tampered);
    let manifest = registry::inspect(&tampered, &["--raw"]);
    let digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = reg.blob_path(&digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&blob, bytes).unwrap();
    assert_refused(&pull(&tampered), "tampered blob", "digest");

    // Layers that try to write outside their directory.
    let dotdot = format!("{}/test/hostile:dotdot", reg.addr);
    registry::push(
        &registry::hostile_layer_image(&work, "../escape"),
        "latest",
        &dotdot,
    );
    assert_refused(&pull(&dotdot), "a '..' entry", "outside the layer");
    let symlink = format!("{}/test/hostile:symlink", reg.addr);
    registry::push(&registry::symlink_escape_image(&work), "latest", &symlink);
    assert_refused(
        &pull(&symlink),
        "a path through a symlink",
        "outside the layer",
    );
    assert!(
        !Path::new("/tmp/brig-escape-marker").exists(),
        "escaped through the symlink"
    );
    assert!(!store.join("escape").exists() && !store.join("tmp/escape").exists());

    assert_eq!(
        (
            dir_entries(&store.join("layers")),
            std::fs::read(store.join("images.json")).unwrap()
        ),
        store_before,
        "the store changed"
    );
    assert_eq!(dir_entries(&store.join("tmp")), Vec::<String>::new());
}

#[test]
fn private_registries_take_the_auth_files_credentials_and_archives_need_none() {
    let work = scratch("images-auth");
    let store = work.join("store");
    let test = "images-auth";
    let reg = Registry::start_with_basic_auth(&work.join("reg"), "alice", "s3cret");
    let layout = registry::test_image(&work);
    let image = format!("{}/private/app:1.0", reg.addr);
    registry::push_as(&layout, "latest", &image, Some("alice:s3cret"));
    // No credentials of the user running the test: a HOME of its own.
    let home = work.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let pull = |auth_file: Option<&Path>| {
        let mut cmd = brig_with_store(test, &store);
        cmd.env("HOME", &home).env_remove("REGISTRY_AUTH_FILE");
        if let Some(file) = auth_file {
            cmd.env("REGISTRY_AUTH_FILE", file);
        }
        cmd.args(["pull", "--tls-verify=false", &image])
            .output()
            .unwrap()
    };

    assert_refused(&pull(None), "no credentials", "REGISTRY_AUTH_FILE");
    let auth = |user_pass: &str| {
        let encoded = Command::new("base64")
            .arg("-w0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(user_pass.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#,
            reg.addr,
            text(&encoded.stdout)
        )
    };
    let wrong = work.join("wrong.json");
    std::fs::write(&wrong, auth("alice:guess")).unwrap();
    assert_refused(&pull(Some(&wrong)), "wrong credentials", "Not authorized");
    assert_eq!(dir_entries(&store.join("layers")), Vec::<String>::new());

    let right = work.join("auth.json");
    std::fs::write(&right, auth("alice:s3cret")).unwrap();
    let out = pull(Some(&right));
    assert!(
        out.status.success(),
        "pull with the auth file: {}",
        text(&out.stderr)
    );
    // docker's own place for them works too.
    std::fs::create_dir_all(home.join(".docker")).unwrap();
    std::fs::copy(&right, home.join(".docker/config.json")).unwrap();
    brig_ok(
        brig_with_store(test, &store)
            .env("HOME", &home)
            .env_remove("REGISTRY_AUTH_FILE")
            .args(["pull", "--tls-verify=false", &image]),
        "pull with ~/.docker/config.json",
    );
    assert_eq!(dir_entries(&store.join("layers")).len(), 3);

    // An OCI archive of the same image: its blobs are the registry's, nothing is unpacked
    // again, and it is an image of its own in the store.
    let archive = work.join("app.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", text(&out.stderr));
    let source = format!("oci-archive:{}:latest", archive.display());
    brig_ok(
        brig_with_store(test, &store).args(["pull", &source]),
        "pull oci-archive:",
    );
    assert_eq!(dir_entries(&store.join("layers")).len(), 3);
    let images = brig_ok(
        brig_with_store(test, &store).args(["images"]),
        "brig images",
    );
    assert!(
        images.contains(&image) && images.contains(&source),
        "{images}"
    );
    assert_eq!(dir_entries(&store.join("tmp")), Vec::<String>::new());
}

//! The fixtures of the image tests, checked on their own (no guest boots): a registry on
//! loopback takes the images pushed to it and gives them back as they were built, whiteouts
//! and hostile tar entries included.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use brig_e2e::registry::{self, Registry};
use brig_e2e::{scratch, stdout_of};

/// The entry names of a gzip layer blob, in order.
fn layer_entries(blob: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("tzf").arg(blob).output().unwrap();
    stdout_of(out, &format!("tar tzf {}", blob.display()))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The layer digests of `reference`, as the registry lists them.
fn layers(reference: &str) -> Vec<String> {
    registry::inspect(reference, &[])["Layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{reference}: skopeo inspect shows no Layers"))
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect()
}

/// Runs `step`, saying how long it took.
fn timed<T>(what: &str, step: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = step();
    eprintln!("registry fixture: {what}: {:.2?}", started.elapsed());
    result
}

#[test]
fn images_pushed_to_the_loopback_registry_read_back_as_built() {
    let dir = scratch("registry-fixture");
    let registry = timed("registry start", || Registry::start(&dir));

    let app = format!("{}/test/app:1.0", registry.addr);
    let layout = timed("umoci test image", || registry::test_image(&dir));
    timed("push test image", || {
        registry::push(&layout, "latest", &app)
    });
    let app_layers = layers(&app);
    assert_eq!(app_layers.len(), 3, "{app}: {app_layers:?}");
    let config = registry::inspect(&app, &["--config"]);
    assert_eq!(config["config"]["User"], "app", "{config}");
    assert_eq!(config["config"]["WorkingDir"], "/data", "{config}");

    // Layer 3, as the registry serves it, deletes by whiteouts (umoci writes no opaque
    // marker for the re-created directory).
    let top = layer_entries(&registry.blob_path(&app_layers[2]));
    for entry in [
        "data/",
        "data/.wh.gone.txt",
        "data/opaque/",
        "data/opaque/.wh.old.txt",
        "data/top.txt",
    ] {
        assert!(
            top.contains(&entry.to_owned()),
            "no {entry} in layer 3: {top:?}"
        );
    }
    eprintln!("registry fixture: layer 3 of {app}: {top:?}");

    let hostile = format!("{}/test/hostile:dotdot", registry.addr);
    let layout = timed("hostile image", || {
        registry::hostile_layer_image(&dir, "../escape")
    });
    timed("push hostile image", || {
        registry::push(&layout, "latest", &hostile)
    });
    let hostile_layers = layers(&hostile);
    assert_eq!(hostile_layers.len(), 1, "{hostile}: {hostile_layers:?}");
    let entries = layer_entries(&registry.blob_path(&hostile_layers[0]));
    assert_eq!(entries.last().map(String::as_str), Some("../escape"));

    let symlink = format!("{}/test/hostile:symlink", registry.addr);
    let layout = registry::symlink_escape_image(&dir);
    registry::push(&layout, "latest", &symlink);
    let symlink_layers = layers(&symlink);
    let entries = layer_entries(&registry.blob_path(&symlink_layers[0]));
    assert_eq!(
        entries[entries.len() - 2..],
        ["evil", "evil/brig-escape-marker"]
    );

    drop(registry);
    std::fs::remove_dir_all(&dir).unwrap();
}

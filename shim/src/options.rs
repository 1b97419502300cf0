//! Runtime options containerd passes with a task: which `brig.toml` to use.
//!
//! containerd's CRI sends a runtime's `options` table (e.g. `ConfigPath = "/etc/brig/brig.toml"`
//! under `[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.sandboxed.options]`) as a
//! `runtimeoptions.v1.Options` message; `ctr run --runtime-config-path` sends the same.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

/// The message's name, the end of the `Any`'s type URL.
const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
/// The longest config path accepted.
const MAX_PATH: usize = 4096;

/// The configuration file the options name (`None`: the default).
pub fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>, String> {
    let Some(any) = options else {
        return Ok(None);
    };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS {
        return Err(format!(
            "runtime options of type {:?} are not for this runtime: give containerd-shim-brig-v2 \
             {RUNTIME_OPTIONS} (in containerd's CRI config: options = {{ ConfigPath = \"/etc/brig/brig.toml\" }})",
            any.type_url
        ));
    }
    let path = decode_config_path(&any.value)
        .map_err(|e| format!("runtime options ({RUNTIME_OPTIONS}) do not parse: {e}"))?;
    match path {
        None => Ok(None),
        Some(p) if p.len() > MAX_PATH => Err(format!(
            "runtime options: ConfigPath is longer than {MAX_PATH} bytes"
        )),
        Some(p) if !p.starts_with('/') => Err(format!(
            "runtime options: ConfigPath {p:?} must be an absolute path to a brig.toml"
        )),
        Some(p) => Ok(Some(PathBuf::from(p))),
    }
}

/// Field 2 (`config_path`, a string) of `runtimeoptions.v1.Options`; other fields
/// (`type_url` = 1, `config_body` = 3) are skipped.
fn decode_config_path(bytes: &[u8]) -> Result<Option<String>, String> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut path = None;
    while !input.eof().map_err(|e| e.to_string())? {
        let tag = input.read_raw_varint32().map_err(|e| e.to_string())?;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 2 && wire == 2 {
            path = Some(input.read_string().map_err(|e| e.to_string())?);
        } else {
            let wire = containerd_shim_protos::protobuf::rt::WireType::new(wire)
                .ok_or_else(|| format!("bad wire type {wire}"))?;
            input.skip_field(wire).map_err(|e| e.to_string())?;
        }
    }
    Ok(path.filter(|p| !p.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    /// field 1 = "x", field 2 = path, field 3 = "body" (what containerd marshals).
    fn encoded(path: &str) -> Vec<u8> {
        let mut v = vec![0x0a, 1, b'x', 0x12, path.len() as u8];
        v.extend_from_slice(path.as_bytes());
        v.extend_from_slice(&[0x1a, 4, b'b', b'o', b'd', b'y']);
        v
    }

    #[test]
    fn the_config_path_is_read_from_containerds_message() {
        let got = config_path(Some(&any(RUNTIME_OPTIONS, encoded("/etc/brig/pod.toml"))));
        assert_eq!(got, Ok(Some(PathBuf::from("/etc/brig/pod.toml"))));
        let prefixed = any(
            "types.containerd.io/runtimeoptions.v1.Options",
            encoded("/a.toml"),
        );
        assert_eq!(
            config_path(Some(&prefixed)),
            Ok(Some(PathBuf::from("/a.toml")))
        );
        assert_eq!(config_path(None), Ok(None));
        assert_eq!(config_path(Some(&any("", vec![]))), Ok(None));
    }

    #[test]
    fn foreign_or_broken_options_are_clear_errors() {
        let runc = config_path(Some(&any("containerd.runc.v1.Options", vec![])));
        assert!(runc.unwrap_err().contains("not for this runtime"));
        let relative = config_path(Some(&any(RUNTIME_OPTIONS, encoded("brig.toml"))));
        assert!(relative.unwrap_err().contains("absolute"));
        let truncated = config_path(Some(&any(RUNTIME_OPTIONS, vec![0x12, 10, b'/'])));
        assert!(truncated.unwrap_err().contains("do not parse"));
    }
}

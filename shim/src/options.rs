//! `containerd.runc.v1.Options`, as the keel shim takes them: each field is
//! honoured or refused with InvalidArgument naming it, never ignored.
//!
//! | field | here |
//! |---|---|
//! | `root` | libcontainer's state directory (default `/run/containerd/keel`), `<root>/<namespace>` |
//! | `no_pivot_root` | honoured (libcontainer's no-pivot) |
//! | `no_new_keyring` | honoured: without it the task gets a new session keyring |
//! | `shim_cgroup` | honoured at `start`: the shim is moved into that cgroup |
//! | `criu_image_path` | with Create: the CRIU image to restore from when the request names no checkpoint |
//! | `criu_work_path` | CRIU's work directory (its logs) for restores, and for checkpoints that name none; default the image directory, as with `runc` |
//! | `binary_name` | there is no runtime binary: refused |
//! | `systemd_cgroup` | no systemd cgroup driver: refused |
//! | `io_uid`, `io_gid` | stdio is handed to the container as given: refused when not 0 |
//! | `task_api_address`, `task_api_version` | sandbox task APIs: refused |

use containerd_shim_protos::shim::oci::{CheckpointOptions, Options};
use protobuf::MessageFull;

use crate::service::Error;

/// Where container state lives when `root` is not given.
pub const DEFAULT_ROOT: &str = "/run/containerd/keel";

/// Longest path a caller may name (the kernel's PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// Whether `p` is an absolute path of at most [`MAX_PATH`] bytes with no `..`
/// component: what this shim takes for a path a caller names.
pub fn plain_absolute(p: &str) -> bool {
    p.len() <= MAX_PATH && p.starts_with('/') && !p.split('/').any(|c| c == "..")
}

/// Decodes options from an `Any`'s type and value; empty means none.
pub fn decode(field: &str, type_url: &str, value: &[u8]) -> Result<Options, Error> {
    let o: Options = unpack(field, type_url, value)?;
    check(field, &o)?;
    Ok(o)
}

/// Decodes a checkpoint's options (`containerd.runc.v1.CheckpointOptions`);
/// empty means none. What CRIU cannot take is refused by `checkpoint::check`.
pub fn decode_checkpoint(
    field: &str,
    type_url: &str,
    value: &[u8],
) -> Result<CheckpointOptions, Error> {
    unpack(field, type_url, value)
}

/// `M` from an `Any`'s type and value (empty: the default), refusing another
/// type and fields this shim does not know (which it would otherwise ignore).
fn unpack<M: MessageFull>(field: &str, type_url: &str, value: &[u8]) -> Result<M, Error> {
    if type_url.is_empty() && value.is_empty() {
        return Ok(M::default());
    }
    let expected = M::descriptor().full_name().to_string();
    let bare = type_url
        .strip_prefix("type.googleapis.com/")
        .unwrap_or(type_url);
    if bare != expected {
        return Err(Error::InvalidArgument(format!(
            "{field}: type {type_url:?} is not {expected}"
        )));
    }
    let o =
        M::parse_from_bytes(value).map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))?;
    if let Some((number, _)) = o.special_fields().unknown_fields().iter().next() {
        return Err(Error::InvalidArgument(format!(
            "{field}: field {number} is not one this shim knows of {expected}; it would be ignored"
        )));
    }
    Ok(o)
}

/// Refuses what this shim cannot honour, naming the field.
pub fn check(field: &str, o: &Options) -> Result<(), Error> {
    let refuse = |name: &str, why: &str| {
        Err(Error::InvalidArgument(format!(
            "{field}.{name}: {why} (runtime io.containerd.keel.v1)"
        )))
    };
    if !o.binary_name.is_empty() {
        return refuse("binary_name", "the keel shim runs no runtime binary");
    }
    if o.systemd_cgroup {
        return refuse("systemd_cgroup", "there is no systemd cgroup driver");
    }
    if o.io_uid != 0 || o.io_gid != 0 {
        return refuse(
            "io_uid",
            "stdio is handed to the container as given; io_uid and io_gid must be 0",
        );
    }
    if !o.task_api_address.is_empty() || o.task_api_version != 0 {
        return refuse("task_api_address", "one shim per task; no sandbox task API");
    }
    for (name, v) in [
        ("root", &o.root),
        ("shim_cgroup", &o.shim_cgroup),
        ("criu_image_path", &o.criu_image_path),
        ("criu_work_path", &o.criu_work_path),
    ] {
        if !v.is_empty() && !plain_absolute(v) {
            return refuse(
                name,
                "must be an absolute path of at most 4096 bytes without \"..\"",
            );
        }
    }
    Ok(())
}

/// libcontainer's state directory for a namespace.
pub fn root(o: &Options, namespace: &str) -> std::path::PathBuf {
    let base = if o.root.is_empty() {
        DEFAULT_ROOT
    } else {
        o.root.as_str()
    };
    std::path::Path::new(base).join(namespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";

    #[test]
    fn every_field_is_honoured_or_refused() {
        let ok = Options {
            root: "/run/k".into(),
            no_pivot_root: true,
            no_new_keyring: true,
            shim_cgroup: "/keel/shims".into(),
            ..Default::default()
        };
        let bytes = ok.write_to_bytes().unwrap();
        assert_eq!(decode("options", RUNC_OPTIONS, &bytes).unwrap(), ok);
        assert_eq!(root(&ok, "ns"), std::path::Path::new("/run/k/ns"));
        let cases: Vec<(Options, &str)> = vec![
            (
                Options {
                    binary_name: "runc".into(),
                    ..Default::default()
                },
                "options.binary_name",
            ),
            (
                Options {
                    systemd_cgroup: true,
                    ..Default::default()
                },
                "options.systemd_cgroup",
            ),
            (
                Options {
                    io_gid: 1,
                    ..Default::default()
                },
                "options.io_uid",
            ),
            (
                Options {
                    criu_work_path: "w".into(),
                    ..Default::default()
                },
                "options.criu_work_path",
            ),
            (
                Options {
                    task_api_version: 2,
                    ..Default::default()
                },
                "options.task_api_address",
            ),
            (
                Options {
                    root: "rel".into(),
                    ..Default::default()
                },
                "options.root",
            ),
            (
                Options {
                    shim_cgroup: "/a/../b".into(),
                    ..Default::default()
                },
                "options.shim_cgroup",
            ),
            (
                Options {
                    criu_image_path: format!("/{}", "a".repeat(MAX_PATH)),
                    ..Default::default()
                },
                "options.criu_image_path",
            ),
        ];
        for (o, want) in cases {
            let e = decode("options", RUNC_OPTIONS, &o.write_to_bytes().unwrap()).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.starts_with(want)),
                "{e:?}"
            );
        }
        let e = decode("options", "containerd.runhcs.v1.Options", b"").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("is not containerd.runc.v1.Options"))
        );
    }
}

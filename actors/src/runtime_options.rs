//! A task's runtime options, `containerd.runc.v1.Options`: checked field by field
//! when a container or a task is created with them, and handed to the shim as
//! containerd's shim manager hands them over.
//!
//! Which options a task runs with: the task's own (`CreateTaskRequest.options`)
//! when given, else its container's (`Container.runtime.options`), else none. They
//! reach the shim twice, as in containerd: marshalled as a `google.protobuf.Any`
//! on the stdin of its `start` (where the runc shim reads `shim_cgroup`), and as
//! `CreateTaskRequest.options` of its Create (everything else). keel fills in one
//! default, `root`: its own runc state directory, so that two keelds, or keel and
//! containerd, never share runc state.
//!
//! Every field is either honoured or refused with InvalidArgument naming it;
//! fields a newer containerd may add, unknown here, are refused too. The same
//! holds for a checkpoint's options (`containerd.runc.v1.CheckpointOptions`,
//! [`check_checkpoint`]).

use std::path::Path;

use keel_protocol::containerd::shim::oci::{CheckpointOptions, Options};
use protobuf::well_known_types::any::Any;
use protobuf::Message;

use crate::{Error, Result};

/// The options' types as containerd's runc shims name them (one with a
/// `type.googleapis.com/` prefix is taken too).
pub use keel_protocol::types::{
    CHECKPOINT_OPTIONS_TYPE_URL as CHECKPOINT_OPTIONS, RUNC_OPTIONS_TYPE_URL as RUNC_OPTIONS,
};

/// Longest path or name accepted in an option.
const MAX_PATH: usize = 4096;

/// Reads and checks options given in `field` (`options`,
/// `container.runtime.options`): InvalidArgument naming the field at fault when
/// keel cannot honour them.
pub fn check(field: &str, type_url: &str, value: &[u8]) -> Result<Options> {
    let o: Options = unpack(field, type_url, value, RUNC_OPTIONS)?;
    let bad = |name: &str, why: String| Error::InvalidArgument(format!("{field}.{name}: {why}"));
    bounded(field, "binary_name", &o.binary_name)?;
    for (name, v) in [
        ("root", &o.root),
        ("shim_cgroup", &o.shim_cgroup),
        ("criu_image_path", &o.criu_image_path),
        ("criu_work_path", &o.criu_work_path),
    ] {
        absolute(field, name, v)?;
    }
    if !o.binary_name.is_empty() && find_binary(&o.binary_name).is_none() {
        return Err(bad(
            "binary_name",
            format!(
                "{:?} is neither an executable path nor on keeld's PATH",
                o.binary_name
            ),
        ));
    }
    // A sandbox's task API (containerd 2's): keel runs a shim per task.
    if !o.task_api_address.is_empty() || o.task_api_version != 0 {
        return Err(bad(
            "task_api_address",
            "keel runs one shim per task and has no sandbox task API to point it at".into(),
        ));
    }
    if o.systemd_cgroup {
        if let Some(init) = not_systemd_init() {
            return Err(bad(
                "systemd_cgroup",
                format!(
                    "systemd's cgroup driver needs systemd as PID 1, and PID 1 here is {init:?}; keel manages cgroups through cgroupfs on this host"
                ),
            ));
        }
        return Err(bad(
            "systemd_cgroup",
            "keel places its tasks' cgroups itself (cgroupfs); the systemd driver is not supported yet".into(),
        ));
    }
    Ok(o)
}

/// keel's own shim.
pub const KEEL_SHIM: &str = "io.containerd.keel.v1";

/// Whether `runtime` (a name, or a shim's path) is keel's own shim.
pub fn is_keel_shim(runtime: &str) -> bool {
    runtime == KEEL_SHIM
        || Path::new(runtime).file_name() == Some("containerd-shim-keel-v1".as_ref())
}

/// CRIU's cgroup modes as containerd names them; empty is CRIU's default (soft).
const CGROUPS_MODES: &[&str] = &["", "soft", "full", "strict", "ignore"];

/// Namespaces a dump may leave out, to be given empty at restore (runc's
/// `--empty-ns`).
const EMPTY_NAMESPACES: &[&str] = &["network"];

/// Reads and checks a checkpoint's options given in `field` for a task of
/// `runtime`: InvalidArgument naming what keel cannot honour there.
pub fn check_checkpoint(
    field: &str,
    runtime: &str,
    type_url: &str,
    value: &[u8],
) -> Result<CheckpointOptions> {
    let o: CheckpointOptions = unpack(field, type_url, value, CHECKPOINT_OPTIONS)?;
    let bad = |name: &str, why: String| Error::InvalidArgument(format!("{field}.{name}: {why}"));
    for (name, v) in [("image_path", &o.image_path), ("work_path", &o.work_path)] {
        absolute(field, name, v)?;
    }
    if let Some(ns) = o
        .empty_namespaces
        .iter()
        .find(|ns| !EMPTY_NAMESPACES.contains(&ns.as_str()))
    {
        return Err(bad(
            "empty_namespaces",
            format!("{ns:?}: only {EMPTY_NAMESPACES:?} can be left out of a dump"),
        ));
    }
    if !CGROUPS_MODES.contains(&o.cgroups_mode.as_str()) {
        return Err(bad(
            "cgroups_mode",
            format!("{:?} is not one of {CGROUPS_MODES:?}", o.cgroups_mode),
        ));
    }
    if !o.cgroups_mode.is_empty() && !is_keel_shim(runtime) {
        return Err(bad(
            "cgroups_mode",
            format!("the runc shim does not pass a cgroups mode on to runc, so it would be ignored (runtime {runtime}; {KEEL_SHIM} honours it)"),
        ));
    }
    Ok(o)
}

/// Decodes options of type `expected` given in `field`: InvalidArgument naming the
/// field for another type, bytes that do not decode, or a field this message
/// does not have (a newer containerd's, which keel would otherwise ignore).
fn unpack<M: Message>(field: &str, type_url: &str, value: &[u8], expected: &str) -> Result<M> {
    let name = type_url
        .strip_prefix("type.googleapis.com/")
        .unwrap_or(type_url);
    if name != expected {
        return Err(Error::InvalidArgument(format!(
            "{field}.type_url: {type_url:?} is not an options type keel takes here (only {expected})"
        )));
    }
    let o = M::parse_from_bytes(value)
        .map_err(|e| Error::InvalidArgument(format!("{field}: not a {expected}: {e}")))?;
    if let Some((number, _)) = o.special_fields().unknown_fields().iter().next() {
        // Field 8 of Options, criu_path, is gone from containerd's Options: runc
        // finds CRIU on its PATH, which is keeld's.
        let what = if expected == RUNC_OPTIONS && number == 8 {
            "criu_path (field 8) is not supported: the CRIU used is the one on keeld's PATH"
                .to_string()
        } else {
            format!("field {number} is not one keel knows of {expected}; it would be ignored")
        };
        return Err(Error::InvalidArgument(format!("{field}: {what}")));
    }
    Ok(o)
}

/// A string option `name` of `field` within bounds: at most [`MAX_PATH`] bytes,
/// no NUL byte.
fn bounded(field: &str, name: &str, v: &str) -> Result<()> {
    let bad = |why: String| Err(Error::InvalidArgument(format!("{field}.{name}: {why}")));
    if v.len() > MAX_PATH {
        return bad(format!("{} bytes, the limit is {MAX_PATH}", v.len()));
    }
    if v.contains('\0') {
        return bad("contains a NUL byte".into());
    }
    Ok(())
}

/// A path option `name` of `field`: [`bounded`], and when given, absolute and
/// without `..`.
fn absolute(field: &str, name: &str, v: &str) -> Result<()> {
    bounded(field, name, v)?;
    let bad = |why: String| Err(Error::InvalidArgument(format!("{field}.{name}: {why}")));
    let p = Path::new(v);
    if !v.is_empty() && !p.is_absolute() {
        return bad(format!("{v:?} must be an absolute path"));
    }
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return bad(format!("{v:?} must not contain \"..\""));
    }
    Ok(())
}

/// The options as the shim gets them: the checked options with keel's `root`
/// default filled in, packed as containerd packs them.
pub fn for_shim(options: Option<&Options>, runc_root: &Path) -> Result<Any> {
    let mut o = options.cloned().unwrap_or_default();
    if o.root.is_empty() {
        o.root = runc_root.display().to_string();
    }
    Ok(Any {
        type_url: RUNC_OPTIONS.into(),
        value: o
            .write_to_bytes()
            .map_err(|e| Error::Io(format!("encode runtime options: {e}")))?,
        ..Default::default()
    })
}

/// Bytes for the shim's `start` stdin: the `Any`, marshalled.
pub fn start_stdin(any: &Any) -> Result<Vec<u8>> {
    any.write_to_bytes()
        .map_err(|e| Error::Io(format!("encode runtime options: {e}")))
}

/// An executable named by an absolute path, or found on keeld's PATH.
fn find_binary(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = Path::new(name);
        return (p.is_absolute() && executable(p)).then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| executable(p))
}

/// `None` when PID 1 is systemd; else what PID 1 is.
fn not_systemd_init() -> Option<String> {
    let comm = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    let comm = comm.trim();
    (comm != "systemd").then(|| comm.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(o: &Options) -> Vec<u8> {
        o.write_to_bytes().unwrap()
    }

    #[test]
    fn each_field_is_checked_and_named() {
        let ok = Options {
            no_pivot_root: true,
            no_new_keyring: true,
            io_uid: 1000,
            io_gid: 1000,
            root: "/run/x".into(),
            binary_name: "sh".into(),
            ..Default::default()
        };
        let got = check("options", RUNC_OPTIONS, &packed(&ok)).unwrap();
        assert_eq!(got, ok);
        check(
            "options",
            &format!("type.googleapis.com/{RUNC_OPTIONS}"),
            &packed(&ok),
        )
        .unwrap();

        let refused = |o: Options, want: &str| {
            let e = check("options", RUNC_OPTIONS, &packed(&o)).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.starts_with(want)),
                "{e:?}, wanted {want}"
            );
        };
        refused(
            Options {
                root: "relative".into(),
                ..Default::default()
            },
            "options.root:",
        );
        refused(
            Options {
                criu_work_path: "/a/../b".into(),
                ..Default::default()
            },
            "options.criu_work_path:",
        );
        refused(
            Options {
                binary_name: "no-such-runtime-binary".into(),
                ..Default::default()
            },
            "options.binary_name:",
        );
        refused(
            Options {
                shim_cgroup: "x".repeat(MAX_PATH + 1),
                ..Default::default()
            },
            "options.shim_cgroup:",
        );
        refused(
            Options {
                systemd_cgroup: true,
                ..Default::default()
            },
            "options.systemd_cgroup:",
        );
    }

    #[test]
    fn an_unknown_type_or_field_is_refused_not_ignored() {
        let e = check(
            "container.runtime.options",
            "containerd.linux.runc.RuncOptions",
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.starts_with("container.runtime.options.type_url:")),
            "{e:?}"
        );
        // Field 99, a varint: a field a newer Options might carry.
        let e = check("options", RUNC_OPTIONS, &[0x98, 0x06, 0x01]).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("field 99")),
            "{e:?}"
        );
        // Field 8, criu_path (a string), as containerd 1.6 still sends it.
        let e = check("options", RUNC_OPTIONS, b"\x42\x04criu").unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("criu_path")),
            "{e:?}"
        );
        let e = check("options", RUNC_OPTIONS, &[0xff]).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument(_)), "{e:?}");
    }

    #[test]
    fn checkpoint_options_are_checked_field_by_field() {
        let ok = CheckpointOptions {
            open_tcp: true,
            external_unix_sockets: true,
            terminal: true,
            file_locks: true,
            empty_namespaces: vec!["network".into()],
            work_path: "/var/tmp/criu".into(),
            ..Default::default()
        };
        let bytes = ok.write_to_bytes().unwrap();
        assert_eq!(
            check_checkpoint(
                "options",
                "io.containerd.runc.v2",
                CHECKPOINT_OPTIONS,
                &bytes
            )
            .unwrap(),
            ok
        );
        let refused = |o: CheckpointOptions, want: &str| {
            let e = check_checkpoint(
                "options",
                "io.containerd.runc.v2",
                CHECKPOINT_OPTIONS,
                &o.write_to_bytes().unwrap(),
            )
            .unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.starts_with(want)),
                "{e:?}, wanted {want}"
            );
        };
        refused(
            CheckpointOptions {
                empty_namespaces: vec!["pid".into()],
                ..Default::default()
            },
            "options.empty_namespaces:",
        );
        refused(
            CheckpointOptions {
                work_path: "relative".into(),
                ..Default::default()
            },
            "options.work_path:",
        );
        refused(
            CheckpointOptions {
                cgroups_mode: "soft".into(),
                ..Default::default()
            },
            "options.cgroups_mode:",
        );
        refused(
            CheckpointOptions {
                cgroups_mode: "loose".into(),
                ..Default::default()
            },
            "options.cgroups_mode:",
        );
        // keel's shim honours the mode.
        let soft = CheckpointOptions {
            cgroups_mode: "soft".into(),
            ..Default::default()
        };
        for runtime in [KEEL_SHIM, "/opt/keel/containerd-shim-keel-v1"] {
            let bytes = soft.write_to_bytes().unwrap();
            assert_eq!(
                check_checkpoint("options", runtime, CHECKPOINT_OPTIONS, &bytes).unwrap(),
                soft
            );
        }
        let e = check_checkpoint("options", KEEL_SHIM, RUNC_OPTIONS, &[]).unwrap_err();
        assert!(matches!(&e, Error::InvalidArgument(m) if m.starts_with("options.type_url")));
    }

    #[test]
    fn the_shim_gets_keel_s_root_unless_one_is_given() {
        let any = for_shim(None, Path::new("/keel/runc")).unwrap();
        assert_eq!(any.type_url, RUNC_OPTIONS);
        assert_eq!(
            Options::parse_from_bytes(&any.value).unwrap().root,
            "/keel/runc"
        );
        let given = Options {
            root: "/mine".into(),
            ..Default::default()
        };
        let any = for_shim(Some(&given), Path::new("/keel/runc")).unwrap();
        assert_eq!(Options::parse_from_bytes(&any.value).unwrap().root, "/mine");
        let stdin = start_stdin(&any).unwrap();
        assert_eq!(Any::parse_from_bytes(&stdin).unwrap(), any);
    }
}

//! The on-disk layout of a task, shared by the task actor and the orphan cleanup:
//! where its bundle, log file, runc state and unpacked checkpoint live, the spec the
//! bundle holds, and the removal of a bundle and of a task's cgroup.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Error, Result};

/// Where a bundle restored before keel kept its checkpoint's image (it now goes to
/// [`restore_dir`]); removed with the bundle.
pub(crate) const CHECKPOINT_DIR: &str = "checkpoint";

/// A task's bundle: `<state>/tasks/<ns>/<id>`.
pub fn bundle_dir(state_dir: &Path, ns: &str, id: &str) -> PathBuf {
    state_dir.join("tasks").join(ns).join(id)
}

/// A detached task's log file: `<state>/logs/<ns>/<id>.log`.
pub fn log_file(state_dir: &Path, ns: &str, id: &str) -> PathBuf {
    state_dir.join("logs").join(ns).join(format!("{id}.log"))
}

/// runc's state directory (the shim's `root` option).
pub fn runc_root(state_dir: &Path) -> PathBuf {
    state_dir.join("runc")
}

/// Where the CRIU image of a task restored from a checkpoint is unpacked, on disk
/// under keeld's root, until its Start has restored it.
pub fn restore_dir(scratch_dir: &Path, ns: &str, id: &str) -> PathBuf {
    scratch_dir.join("restore").join(ns).join(id)
}

/// Bundles under `<state>/tasks/<ns>/<id>`, as (namespace, id).
pub fn bundles(state_dir: &Path) -> Vec<(String, String)> {
    task_dirs(&state_dir.join("tasks"))
}

/// Directories `<dir>/<ns>/<id>`, as (namespace, id).
pub fn task_dirs(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(dir) else {
        return out;
    };
    for ns in namespaces.flatten() {
        let Ok(ids) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for id in ids.flatten() {
            if let (Some(n), Some(i)) = (ns.file_name().to_str(), id.file_name().to_str()) {
                out.push((n.to_string(), i.to_string()));
            }
        }
    }
    out
}

/// Adapts the container's spec to its bundle: rootfs at `<bundle>/rootfs` (where the
/// shim mounts it), an absolute cgroups path `/keel/<ns>/<id>`, and a terminal
/// exactly when the task has one.
pub fn bundle_spec(spec: &[u8], ns: &str, id: &str, terminal: bool) -> Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(spec)
        .map_err(|e| Error::InvalidArgument(format!("spec is not valid JSON: {e}")))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("spec must be a JSON object".into()))?;
    let root = obj.entry("root").or_insert_with(|| serde_json::json!({}));
    root["path"] = serde_json::json!("rootfs");
    let linux = obj.entry("linux").or_insert_with(|| serde_json::json!({}));
    linux["cgroupsPath"] = serde_json::json!(format!("/keel/{ns}/{id}"));
    if let Some(p) = obj.get_mut("process").and_then(|p| p.as_object_mut()) {
        p.insert("terminal".into(), serde_json::json!(terminal));
    }
    Ok(serde_json::to_vec_pretty(&v).expect("json serialises"))
}

/// runc's annotation naming the CRIU configuration file it gives CRIU.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// For a restore whose CRIU options must be given again (`tcp-established`, …):
/// writes them to `<bundle>/criu.conf` (one per line, CRIU's configuration file
/// format) and points runc at it with its `org.criu.config` annotation, the one
/// way to reach CRIU past a shim that passes no such options at restore.
pub fn with_criu_config(spec: Vec<u8>, bundle: &Path, options: &[String]) -> Result<Vec<u8>> {
    if options.is_empty() {
        return Ok(spec);
    }
    let conf = bundle.join("criu.conf");
    let mut text = options.join("\n");
    text.push('\n');
    std::fs::write(&conf, text).map_err(|e| Error::Io(format!("write {}: {e}", conf.display())))?;
    let mut v: serde_json::Value = serde_json::from_slice(&spec)
        .map_err(|e| Error::InvalidArgument(format!("spec is not valid JSON: {e}")))?;
    let annotations = v
        .as_object_mut()
        .ok_or_else(|| Error::InvalidArgument("spec must be a JSON object".into()))?
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    annotations[CRIU_CONFIG_ANNOTATION] = serde_json::json!(conf.display().to_string());
    Ok(serde_json::to_vec_pretty(&v).expect("json serialises"))
}

/// Removes a bundle without ever following into a still-mounted rootfs: files are
/// unlinked one by one and `rootfs` is only `rmdir`ed, which fails if it is a mount
/// point or not empty.
pub fn remove_bundle(bundle: &Path) -> Result<()> {
    let rootfs = bundle.join("rootfs");
    if rootfs.exists() {
        let _ = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH);
        std::fs::remove_dir(&rootfs)
            .map_err(|e| Error::Io(format!("remove {}: {e}", rootfs.display())))?;
    }
    let entries = match std::fs::read_dir(bundle) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Io(format!("read {}: {e}", bundle.display()))),
    };
    for entry in entries.flatten() {
        let p = entry.path();
        let r = if entry.file_name() == CHECKPOINT_DIR || entry.file_name() == "work" {
            // The unpacked CRIU image and the shim's work directory (CRIU's restore
            // log): plain files, never a mount.
            std::fs::remove_dir_all(&p)
        } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::Io(format!("remove {}: {e}", p.display())))?;
    }
    std::fs::remove_dir(bundle).map_err(|e| Error::Io(format!("remove {}: {e}", bundle.display())))
}

/// Removes a task's cgroup (`/keel/<ns>/<id>`), if runc left it, from the unified
/// hierarchy or from every v1 controller; with `parent`, also the namespace's
/// `/keel/<ns>` once it is empty. Only [`CgroupParents::remove`] passes `parent`: runc
/// creates the parent of a new task's cgroup, which must not vanish under it.
pub fn remove_cgroups(ns: &str, id: &str, parent: bool) {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
        vec![root.to_path_buf()]
    } else {
        match std::fs::read_dir(root) {
            Ok(entries) => entries.flatten().map(|c| c.path()).collect(),
            Err(_) => return,
        }
    };
    for h in hierarchies {
        let base = h.join("keel").join(ns);
        let _ = std::fs::remove_dir(base.join(id));
        if parent {
            let _ = std::fs::remove_dir(&base);
        }
    }
}

/// Keeps `/keel/<ns>` from being removed while a shim's Create (where runc makes the
/// task's cgroup under it) is under way: creates hold it shared, removal exclusive.
#[derive(Debug, Clone, Default)]
pub struct CgroupParents(Arc<tokio::sync::RwLock<()>>);

impl CgroupParents {
    /// Held (shared) while a shim's Create makes a task's cgroup under the parent.
    pub async fn hold(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.0.read().await
    }

    /// Removes a task's cgroup and, once empty, its namespace's parent.
    pub async fn remove(&self, ns: &str, id: &str) {
        let _exclusive = self.0.write().await;
        remove_cgroups(ns, id, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_spec_sets_rootfs_and_absolute_cgroup() {
        let out = bundle_spec(
            br#"{"ociVersion":"1.0.2","root":{"path":"/elsewhere","readonly":true},"process":{"terminal":false}}"#,
            "ns",
            "web",
            true,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["root"]["path"], "rootfs");
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["linux"]["cgroupsPath"], "/keel/ns/web");
        assert_eq!(v["process"]["terminal"], true);
        assert!(matches!(
            bundle_spec(b"[1]", "n", "i", false),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_restore_s_criu_options_go_to_a_config_file_runc_is_pointed_at() {
        let dir = tempfile::tempdir().unwrap();
        let spec = br#"{"ociVersion":"1.0.2"}"#.to_vec();
        assert_eq!(
            with_criu_config(spec.clone(), dir.path(), &[]).unwrap(),
            spec
        );
        let options = ["tcp-established".to_string(), "file-locks".to_string()];
        let out = with_criu_config(spec, dir.path(), &options).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let conf = dir.path().join("criu.conf");
        assert_eq!(
            v["annotations"]["org.criu.config"],
            conf.display().to_string()
        );
        assert_eq!(
            std::fs::read_to_string(conf).unwrap(),
            "tcp-established\nfile-locks\n"
        );
    }

    #[test]
    fn bundle_removal_never_descends_into_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let b = dir.path().join("t1");
        std::fs::create_dir_all(b.join("rootfs/bin")).unwrap();
        std::fs::write(b.join("config.json"), "{}").unwrap();
        // rootfs not empty (as if still mounted): refused, nothing inside removed.
        assert!(remove_bundle(&b).is_err());
        assert!(b.join("rootfs/bin").exists());
        std::fs::remove_dir(b.join("rootfs/bin")).unwrap();
        remove_bundle(&b).unwrap();
        assert!(!b.exists());
    }

    #[test]
    fn bundles_are_listed_per_namespace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tasks/ns1/a")).unwrap();
        std::fs::create_dir_all(dir.path().join("tasks/ns2/b")).unwrap();
        let mut b = bundles(dir.path());
        b.sort();
        assert_eq!(
            b,
            vec![("ns1".into(), "a".into()), ("ns2".into(), "b".into())]
        );
    }
}

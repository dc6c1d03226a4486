//! Checkpoint options: every field of containerd's `CheckpointOptions`, as a
//! builder.

use std::path::{Path, PathBuf};

use keel_protocol::api::tasks::CheckpointTaskRequest;
use keel_protocol::containerd::shim::oci::CheckpointOptions as Wire;
use keel_protocol::types::CHECKPOINT_OPTIONS_TYPE_URL;
use keel_protocol::{Error, Result};
use protobuf::well_known_types::any::Any;
use protobuf::Message;

/// How a task is checkpointed.
///
/// ```
/// use keel_client::CheckpointOptions;
///
/// let opts = CheckpointOptions::new()
///     .exit(true)
///     .tcp_established(true)
///     .empty_namespace("network")
///     .cgroups_mode("soft");
/// assert!(opts.wire().open_tcp);
/// ```
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    exit: bool,
    image_path: Option<PathBuf>,
    wire: Wire,
    work_path: Option<PathBuf>,
    rw: bool,
}

impl CheckpointOptions {
    /// A checkpoint into keel's content store, after which the task runs on.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets the task exit after the checkpoint instead of resuming it.
    pub fn exit(mut self, exit: bool) -> Self {
        self.exit = exit;
        self
    }

    /// Also stores the task's filesystem changes (the upper directory of its
    /// overlay rootfs) as a layer of the checkpoint, which a restore onto an
    /// overlay puts back: containerd's `WithCheckpointRW`. The task is paused
    /// from the dump until they are copied, unless it exits with the dump.
    pub fn rw(mut self, rw: bool) -> Self {
        self.rw = rw;
        self
    }

    /// Leaves the raw CRIU image in this directory instead of the content store.
    pub fn image_path(mut self, dir: impl AsRef<Path>) -> Self {
        self.image_path = Some(dir.as_ref().to_path_buf());
        self
    }

    /// Dumps established TCP connections (restored with the task).
    pub fn tcp_established(mut self, on: bool) -> Self {
        self.wire.open_tcp = on;
        self
    }

    /// Dumps unix sockets connected outside the container.
    pub fn external_unix_sockets(mut self, on: bool) -> Self {
        self.wire.external_unix_sockets = on;
        self
    }

    /// Dumps a task that has a terminal.
    pub fn terminal(mut self, on: bool) -> Self {
        self.wire.terminal = on;
        self
    }

    /// Dumps file locks.
    pub fn file_locks(mut self, on: bool) -> Self {
        self.wire.file_locks = on;
        self
    }

    /// Leaves namespace `ns` out of the dump, to be given empty at restore.
    pub fn empty_namespace(mut self, ns: impl Into<String>) -> Self {
        self.wire.empty_namespaces.push(ns.into());
        self
    }

    /// How CRIU handles cgroups: `soft`, `full`, `strict` or `ignore`. Honoured
    /// by keel's shim (`io.containerd.keel.v1`); keeld refuses it for a task on
    /// containerd's runc shim, which does not pass it on.
    pub fn cgroups_mode(mut self, mode: impl Into<String>) -> Self {
        self.wire.cgroups_mode = mode.into();
        self
    }

    /// The directory CRIU works in and leaves its logs in.
    pub fn work_path(mut self, dir: impl AsRef<Path>) -> Self {
        self.work_path = Some(dir.as_ref().to_path_buf());
        self
    }

    /// The CRIU options as they travel (`containerd.runc.v1.CheckpointOptions`).
    pub fn wire(&self) -> Wire {
        let mut w = self.wire.clone();
        if let Some(p) = &self.work_path {
            w.work_path = p.display().to_string();
        }
        w
    }

    /// The CRIU options packed, or none when every one is the default.
    pub fn packed(&self) -> Result<Option<Any>> {
        let mut w = self.wire();
        if let Some(p) = &self.work_path {
            w.work_path = absolute("work path", p)?;
        }
        if w == Wire::default() {
            return Ok(None);
        }
        Ok(Some(Any {
            type_url: CHECKPOINT_OPTIONS_TYPE_URL.into(),
            value: w.write_to_bytes()?,
            ..Default::default()
        }))
    }

    /// The Checkpoint request for task `id`.
    pub fn request(&self, id: &str) -> Result<CheckpointTaskRequest> {
        Ok(CheckpointTaskRequest {
            container_id: id.to_string(),
            exit: self.exit,
            image_path: match &self.image_path {
                Some(p) => absolute("image path", p)?,
                None => String::new(),
            },
            options: self.packed()?.into(),
            rw: self.rw,
            ..Default::default()
        })
    }
}

fn absolute(what: &str, p: &Path) -> Result<String> {
    std::path::absolute(p)
        .map(|p| p.display().to_string())
        .map_err(|e| Error::InvalidArgument(format!("{what} {}: {e}", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_reaches_the_request() {
        let r = CheckpointOptions::new()
            .exit(true)
            .image_path("/tmp/img")
            .tcp_established(true)
            .external_unix_sockets(true)
            .terminal(true)
            .file_locks(true)
            .empty_namespace("network")
            .cgroups_mode("soft")
            .work_path("/tmp/work")
            .request("t")
            .unwrap();
        assert!(r.exit);
        assert_eq!(r.image_path, "/tmp/img");
        let w = Wire::parse_from_bytes(&r.options.value).unwrap();
        assert_eq!(r.options.type_url, CHECKPOINT_OPTIONS_TYPE_URL);
        assert!(w.open_tcp && w.external_unix_sockets && w.terminal && w.file_locks);
        assert_eq!(w.empty_namespaces, ["network"]);
        assert_eq!(
            (w.cgroups_mode.as_str(), w.work_path.as_str()),
            ("soft", "/tmp/work")
        );
    }

    #[test]
    fn no_options_send_none() {
        let r = CheckpointOptions::new().request("t").unwrap();
        assert!(r.options.is_none() && !r.exit && r.image_path.is_empty());
    }
}

//! Checkpoint and restore requests, as containerd's runc shim takes them:
//! Checkpoint dumps the running task (`crate::checkpoint::dump`); a Create that
//! names a checkpoint (or `options.criu_image_path`) only prepares the task,
//! whose process CRIU restores at Start.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::{self, CreateTaskRequest};
use containerd_shim_protos::shim::oci::Options;

use super::{Error, Init, Result, Shim};
use crate::checkpoint::{self, Dump, Restore};
use crate::container as ctr;
use crate::log::log_warn;
use crate::stdio::{self, Held};
use crate::{cgroups, options};

/// A task created from a checkpoint, restored at Start.
#[derive(Debug)]
pub(super) struct Pending {
    image: PathBuf,
    /// The process's stdin, stdout and stderr; none with a terminal.
    stdio: Option<[OwnedFd; 3]>,
}

fn absolute(field: &str, p: &str) -> Result<PathBuf> {
    if !options::plain_absolute(p) {
        return Err(Error::InvalidArgument(format!(
            "{field} {p:?}: not an absolute path of at most {} bytes without \"..\"",
            options::MAX_PATH
        )));
    }
    Ok(PathBuf::from(p))
}

/// CRIU's work directory (its logs): the first one given, else the image's
/// own, as `runc` does.
fn work_dir(given: &[&str], image: &Path) -> PathBuf {
    given
        .iter()
        .find(|g| !g.is_empty())
        .map_or_else(|| image.to_path_buf(), PathBuf::from)
}

/// The image a Create restores from, if any: its `checkpoint`, else the
/// options' `criu_image_path` (containerd's restore from a directory).
pub(super) fn image(req: &CreateTaskRequest, opts: &Options) -> Result<Option<PathBuf>> {
    if !req.parent_checkpoint.is_empty() {
        return Err(Error::InvalidArgument(
            "parent_checkpoint: CRIU follows an image's own parent link; name only the checkpoint"
                .into(),
        ));
    }
    match (req.checkpoint.as_str(), opts.criu_image_path.as_str()) {
        ("", "") => Ok(None),
        ("", dir) => absolute("options.criu_image_path", dir).map(Some),
        (dir, other) if !other.is_empty() && other != dir => Err(Error::InvalidArgument(format!(
            "options.criu_image_path {other:?}: the request names another checkpoint, {dir:?}"
        ))),
        (dir, _) => absolute("checkpoint", dir).map(Some),
    }
}

/// Prepares a task to be restored from `image` at Start: its state (no process
/// yet) and its stdio, opened now so that a bad stream fails the Create.
pub(super) fn prepare(
    req: &CreateTaskRequest,
    image: PathBuf,
    root: &Path,
    bundle: &Path,
) -> Result<(libcontainer::container::Container, Held, Pending)> {
    let (stdio, held) = if req.terminal {
        crate::console::check(&req.stdin, &req.stdout)?;
        (None, Held::default())
    } else {
        let o = stdio::open(&req.stdin, &req.stdout, &req.stderr)?;
        (Some([o.stdin, o.stdout, o.stderr]), o.held)
    };
    let container = ctr::prepare_restore(&req.id, root, bundle)?;
    let pending = Pending { image, stdio };
    Ok((container, held, pending))
}

impl Shim {
    /// Restores the init of a task prepared by [`prepare`]; on success it runs,
    /// its pid recorded, and the new terminal's master (if any) is returned.
    pub(super) fn restore(&self, init: &mut Init) -> Result<Option<OwnedFd>> {
        let pending = init
            .restore
            .as_ref()
            .ok_or_else(|| Error::Internal("no restore pending".into()))?;
        let state_dir = init.root.join(&self.id);
        let stdio = pending.stdio.as_ref().map(|[i, o, e]| [i, o, e]);
        let cgroup = init.cgroup.clone();
        let restored = checkpoint::restore(
            &Restore {
                bundle: &self.bundle,
                cgroup: &cgroup,
                state_dir: &state_dir,
                image: &pending.image,
                work: &work_dir(&[&init.criu_work], &pending.image),
                stdio,
            },
            |criu, resources| {
                cgroups::add_process(&cgroup.display().to_string(), criu)?;
                // Every hierarchy, for a restore in cgroups mode ignore (the
                // restored processes are then where CRIU is).
                if let Err(e) = cgroups::join_everywhere(&cgroup, criu) {
                    log_warn!("{e}");
                }
                resources.map_or(Ok(()), |r| cgroups::update(&cgroup, r))
            },
            |pid| ctr::restore_namespaces(&init.container, pid),
        )?;
        // The process runs: it is the task's now, whatever follows; it has its
        // own copies of its stdio.
        init.proc.pid = restored.pid;
        init.restore = None;
        if let Err(e) = ctr::restored(&mut init.container, restored.pid) {
            // Unrecorded, libcontainer could not signal it: it goes, and its exit
            // is reaped as any.
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(restored.pid, libc::SIGKILL) };
            return Err(e);
        }
        Ok(restored.master)
    }

    pub(super) fn checkpoint(&self, req: &api::CheckpointTaskRequest) -> Result<()> {
        let (type_url, value) = super::any_parts(&req.options);
        let o = options::decode_checkpoint("options", type_url, value)?;
        let image = match (req.path.as_str(), o.image_path.as_str()) {
            ("", "") => {
                return Err(Error::InvalidArgument(
                    "path: where the image goes is required".into(),
                ))
            }
            ("", p) => absolute("options.image_path", p)?,
            (p, _) => absolute("path", p)?,
        };
        self.with_init(&req.id, |init| {
            let work = work_dir(&[&o.work_path, &init.criu_work], &image);
            if !init.started || init.restore.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "task {:?} has not started",
                    req.id
                )));
            }
            if init.proc.exited().is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "task {:?} has exited",
                    req.id
                )));
            }
            if init.proc.terminal && !o.terminal {
                return Err(Error::FailedPrecondition(format!(
                    "options.terminal: task {:?} has a terminal, which CRIU dumps only with it",
                    req.id
                )));
            }
            checkpoint::dump(&Dump {
                pid: init.proc.pid,
                bundle: &self.bundle,
                cgroup: &init.cgroup,
                image: &image,
                work: &work,
                options: &o,
            })
        })
    }
}

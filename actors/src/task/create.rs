//! Creating a task: bundle, shim `start`, the durable record, Connect and Create,
//! then its actor. On failure nothing is left behind, except a checkpoint's
//! filesystem changes put into the task's own upper directory.

use super::*;
use crate::runtime_options;

/// The container's rootfs mounts as the shim takes them with Create.
fn mounts(rootfs: &[MountRecord]) -> Vec<api::Mount> {
    rootfs
        .iter()
        .map(|m| api::Mount {
            type_: m.kind.clone(),
            source: m.source.clone(),
            target: m.target.clone(),
            options: m.options.clone(),
            ..Default::default()
        })
        .collect()
}

impl Tasks {
    /// Creates the task: bundle, shim, Create. On failure nothing is left behind.
    /// `reservation` holds the task's id (taken before the container was read).
    pub async fn create(&self, reservation: Reservation, req: CreateTask) -> Result<TaskHandle> {
        let ns = req.namespace.clone();
        let id = req.container.id.clone();
        let key = (ns.clone(), id.clone());
        if reservation.key != key {
            return Err(Error::InvalidArgument(format!(
                "task {id}: the reservation is for {:?}",
                reservation.key
            )));
        }
        let meta = self.env.meta.clone();
        let (n2, i2) = (ns.clone(), id.clone());
        if blocking(move || meta.task(&n2, &i2)).await?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "task {id} already exists in namespace {ns}"
            )));
        }
        // An unknown runtime is the caller's error.
        resolve_runtime(req.runtime())?;
        // Right after a restart, the scan for orphans may still be under way.
        let mut scan = lock(&self.orphan_scan).clone();
        let _ = scan.wait_for(|done| *done).await;
        let cleaning = lock(&self.orphans).get(&key).cloned();
        if let Some(mut cleaning) = cleaning {
            tracing::info!(namespace = %ns, task_id = %id, "waiting for the cleanup of an orphan of the same id");
            let _ = cleaning.wait_for(|done| *done).await;
        }
        let cmd = self.shim_command(&ns, &id, Some(req.runtime()));
        let bundle = cmd.bundle.clone();
        match self.create_inner(&req, &cmd, &reservation).await {
            Ok(handle) => {
                drop(reservation);
                Ok(handle)
            }
            Err((e, shim)) => {
                tracing::warn!(namespace = %ns, task_id = %id, error = %e, "task create failed; cleaning up");
                // The record goes first, so that a crash during the cleanup leaves an
                // orphan for the next start to clean up, not a task that never ran.
                let (n2, i2) = (ns.clone(), id.clone());
                let _ = durably(&self.env.meta, move |m| m.delete_task(&n2, &i2)).await;
                if let Some(shim) = shim {
                    delete_and_shut_down(&shim, &id).await;
                }
                let _ = remove_bundle(&bundle);
                let _ = std::fs::remove_dir_all(self.env.restore_dir(&ns, &id));
                self.cgroups.remove(&ns, &id).await;
                Err(e)
            }
        }
    }

    async fn create_inner(
        &self,
        req: &CreateTask,
        cmd: &ShimCommand,
        reservation: &Reservation,
    ) -> Result<TaskHandle, (Error, Option<ShimClient>)> {
        let ns = &req.namespace;
        let id = &req.container.id;
        let bundle = &cmd.bundle;
        let fail = |e: Error| (e, None);
        if bundle.exists() {
            // A leftover from a crash during create; nothing references it.
            remove_bundle(bundle).map_err(fail)?;
        }
        std::fs::create_dir_all(bundle.join("rootfs"))
            .map_err(|e| fail(Error::Io(format!("create bundle: {e}"))))?;
        let spec = bundle::bundle_spec(&req.container.spec, ns, id, req.terminal).map_err(fail)?;
        let spec = match &req.checkpoint {
            Some(Restore::Image { criu, .. }) => {
                bundle::with_criu_config(spec, bundle, criu).map_err(fail)?
            }
            _ => spec,
        };
        std::fs::write(bundle.join("config.json"), spec)
            .map_err(|e| fail(Error::Io(format!("write config.json: {e}"))))?;
        let log = LogFifo::open(bundle, ns, id).map_err(fail)?;
        let checkpoint_dir = match &req.checkpoint {
            Some(Restore::Directory(dir)) => Some(dir.clone()),
            Some(Restore::Image { tar, .. }) => {
                let (tar, dir) = (tar.clone(), self.env.restore_dir(ns, id));
                let (d, limits) = (dir.clone(), self.env.limits.clone());
                let _ = std::fs::remove_dir_all(&dir);
                blocking_io(move || checkpoint::unpack_image(&tar, &d, &limits))
                    .await
                    .map_err(fail)?;
                Some(dir)
            }
            None => None,
        };
        if let Some(dir) = &checkpoint_dir {
            checkpoint::check_restorable(dir, req.runtime()).map_err(fail)?;
        }
        let (stdout, stderr, log_path) =
            if req.log_to_file && req.stdout.is_empty() && req.stderr.is_empty() {
                let p = self.env.log_file(ns, id);
                std::fs::create_dir_all(p.parent().expect("log dir"))
                    .map_err(|e| fail(Error::Io(format!("create log dir: {e}"))))?;
                let url = format!("file://{}", p.display());
                (url.clone(), url, Some(p.display().to_string()))
            } else {
                (req.stdout.clone(), req.stderr.clone(), None)
            };

        // The options it runs with, as the shim gets them: on `start`'s stdin and
        // with Create. Its own when given, else its container's (checked again:
        // a binary named when the container was made may be gone).
        let (field, given) = match &req.options {
            Some(own) => ("options", Some(own.clone())),
            None => (
                "container.runtime.options",
                req.container.runtime_options.clone(),
            ),
        };
        let checked = given
            .as_ref()
            .map(|(url, value)| runtime_options::check(field, url, value))
            .transpose()
            .map_err(fail)?;
        let options =
            runtime_options::for_shim(checked.as_ref(), &self.env.runc_root()).map_err(fail)?;
        let stdin = runtime_options::start_stdin(&options).map_err(fail)?;
        // The checkpoint's filesystem changes go into the task's upper directory
        // last before its shim starts. A restore that fails from here on leaves
        // them there, as containerd's WithRestoreRW leaves its snapshot.
        if let Some(Restore::Image {
            rw: Some(layer), ..
        }) = &req.checkpoint
        {
            let rootfs = req.rootfs.as_deref().unwrap_or(&req.container.rootfs);
            let upper = rw_layer::upper_dir(rootfs).ok_or_else(|| {
                fail(Error::FailedPrecondition(format!(
                    "checkpoint: it holds task {id}'s filesystem changes (taken with rw), which go into the upper directory of an overlay rootfs; give the task one overlay mount with an absolute upperdir"
                )))
            })?;
            let (layer, limits) = (layer.clone(), self.env.limits.clone());
            blocking_io(move || rw_layer::apply(&layer, &upper, &limits))
                .await
                .map_err(fail)?;
        }
        cmd.note_binary().map_err(fail)?;
        let started = cmd.start(&stdin).await.map_err(fail)?;
        let address = started.address;
        // The shim's address is durable before anything reports the task created, so
        // a crash from here on leaves a task keel can find and reconcile.
        let mut record = TaskRecord {
            id: id.clone(),
            bundle: bundle.display().to_string(),
            shim_address: address.clone(),
            shim_pid: 0,
            pid: 0,
            stdin: req.stdin.clone(),
            stdout,
            stderr,
            terminal: req.terminal,
            log_path,
            created_ns: nanos(SystemTime::now()),
            started: false,
            runtime: Some(req.runtime().to_string()),
            task_api: started.task_api,
            rootfs: req.rootfs.clone(),
            runtime_options: given,
        };
        let persist = |record: TaskRecord| {
            let meta = self.env.meta.clone();
            let ns = ns.clone();
            async move { blocking(move || meta.put_task(&ns, &record)).await }
        };
        persist(record.clone()).await.map_err(fail)?;

        let shim = ShimClient::connect(&address, ns)
            .await
            .and_then(|s| s.task_api(started.task_api))
            .map_err(|e| fail(e.into()))?;
        let with_shim = |e: Error| (e, Some(shim.clone()));
        let conn = shim
            .connect_shim(
                &api::ConnectRequest {
                    id: id.clone(),
                    ..Default::default()
                },
                rpc_timeout(),
            )
            .await
            .map_err(|e| with_shim(e.into()))?;
        record.shim_pid = conn.shim_pid;
        reservation.shim_started(conn.shim_pid);

        let create = api::CreateTaskRequest {
            id: id.clone(),
            bundle: bundle.display().to_string(),
            rootfs: mounts(req.rootfs.as_deref().unwrap_or(&req.container.rootfs)),
            terminal: req.terminal,
            stdin: req.stdin.clone(),
            stdout: record.stdout.clone(),
            stderr: record.stderr.clone(),
            options: MessageField::some(options),
            checkpoint: checkpoint_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            ..Default::default()
        };
        let created = {
            let _parent_stays = self.cgroups.hold().await;
            shim.create(&create, rpc_timeout())
                .await
                .map_err(|e| with_shim(e.into()))?
        };
        record.pid = created.pid;
        // Shim pid and task pid can be read back from the shim (Connect, State), so
        // this update need not wait for the disk.
        let (meta, ns2, r2) = (self.env.meta.clone(), ns.clone(), record.clone());
        blocking(move || meta.update_task_lazily(&ns2, &r2))
            .await
            .map_err(with_shim)?;

        let event = ev::TaskCreate {
            container_id: id.clone(),
            bundle: record.bundle.clone(),
            pid: created.pid,
            ..Default::default()
        };
        // Reported created only once its event is on disk.
        if let Err(e) = self
            .env
            .monitor
            .publish(
                ns,
                "/tasks/create",
                pack(&event).map_err(|e| with_shim(e.into()))?,
            )
            .await
        {
            tracing::error!(namespace = %ns, task_id = %id, error = %e, "publishing /tasks/create failed");
        }

        let durable = Durable {
            record,
            exit: None,
            execs: HashMap::new(),
            runtime: Some(req.runtime().to_string()),
        };
        Ok(self.spawn_actor(ns, durable, Origin::Created { shim, log }, None))
    }
}

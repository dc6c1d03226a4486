//! Containers: created from a [`ContainerSpec`], got, listed with containerd's
//! filters, updated and deleted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use keel_protocol::api::containers::{container::Runtime, *};
use keel_protocol::api::types::Mount;
use keel_protocol::containerd::shim::oci::Options as RuncOptions;
use keel_protocol::types::{json_any, RUNC_OPTIONS_TYPE_URL, SPEC_TYPE_URL};
use keel_protocol::{Error, Result};
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::field_mask::FieldMask;
use protobuf::{Message, MessageField};

use crate::client::{Client, Retry};
use crate::io::Io;
use crate::task::{Task, TaskOptions};

/// Resource limits, written into the OCI spec's `linux.resources` (and taken by
/// [`Task::update`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Memory limit in bytes (swap limited to the same).
    pub memory_bytes: Option<i64>,
    /// CPU limit in cores, e.g. 0.5.
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids: Option<i64>,
}

impl Limits {
    /// The limits as OCI `LinuxResources` JSON (only those set); InvalidArgument
    /// naming the limit if one is out of range.
    pub fn resources(&self) -> Result<serde_json::Value> {
        let mut resources = serde_json::json!({});
        if let Some(m) = self.memory_bytes {
            if m <= 0 {
                return Err(invalid(format!(
                    "memory limit must be a positive number of bytes, got {m}"
                )));
            }
            resources["memory"] = serde_json::json!({ "limit": m, "swap": m });
        }
        if let Some(c) = self.cpus {
            if !(c > 0.0 && c <= 1024.0) {
                return Err(invalid(format!("cpus must be between 0 and 1024, got {c}")));
            }
            let period: u64 = 100_000;
            // Bounded above, so the rounded quota fits easily.
            #[allow(clippy::cast_possible_truncation)]
            let quota = (c * period as f64).round() as i64;
            resources["cpu"] = serde_json::json!({ "quota": quota, "period": period });
        }
        if let Some(n) = self.pids {
            if n <= 0 {
                return Err(invalid(format!("pids limit must be positive, got {n}")));
            }
            resources["pids"] = serde_json::json!({ "limit": n });
        }
        Ok(resources)
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn invalid(m: String) -> Error {
    Error::InvalidArgument(m)
}

/// What a container is made of: its OCI spec (from runc's defaults, as ctr
/// starts), root filesystem, labels and runtime.
///
/// ```
/// use keel_client::{ContainerSpec, Limits};
///
/// let spec = ContainerSpec::new("web", "/srv/rootfs")
///     .args(["httpd", "-f"])
///     .env("PORT", "8080")
///     .cwd("/www")
///     .limits(Limits { memory_bytes: Some(64 << 20), ..Default::default() })
///     .label("app", "web");
/// assert_eq!(spec.id(), "web");
/// ```
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    id: String,
    rootfs: Option<PathBuf>,
    read_only: bool,
    rootfs_mounts: Vec<Mount>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    terminal: bool,
    limits: Limits,
    mounts: Vec<serde_json::Value>,
    labels: HashMap<String, String>,
    runtime: String,
    runtime_options: Option<Any>,
    spec: Option<Vec<u8>>,
}

impl ContainerSpec {
    /// A container `id` whose root filesystem is the host directory `rootfs`
    /// (bind-mounted, writable unless [`ContainerSpec::read_only`]).
    pub fn new(id: impl Into<String>, rootfs: impl AsRef<Path>) -> Self {
        Self {
            rootfs: Some(rootfs.as_ref().to_path_buf()),
            ..Self::without_rootfs(id)
        }
    }

    /// A container with no root filesystem yet: give one with
    /// [`ContainerSpec::rootfs_mounts`] (or at task creation).
    pub fn without_rootfs(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            rootfs: None,
            read_only: false,
            rootfs_mounts: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: "/".into(),
            terminal: false,
            limits: Limits::default(),
            mounts: Vec::new(),
            labels: HashMap::new(),
            runtime: String::new(),
            runtime_options: None,
            spec: None,
        }
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The init process's command and arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// One environment variable (`PATH` is set unless given).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The working directory (default `/`).
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = cwd.into();
        self
    }

    /// Whether the init process gets a terminal (its IO must have one too).
    pub fn terminal(mut self, terminal: bool) -> Self {
        self.terminal = terminal;
        self
    }

    /// Resource limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Makes the root filesystem read-only.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Mounts making up the root filesystem instead of one host directory (bind,
    /// overlay, tmpfs), mounted in order.
    pub fn rootfs_mounts(mut self, mounts: Vec<Mount>) -> Self {
        self.rootfs = None;
        self.rootfs_mounts = mounts;
        self
    }

    /// One more mount in the container (an OCI spec mount).
    pub fn mount(self, kind: &str, source: &str, destination: &str, options: &[&str]) -> Self {
        self.oci_mount(serde_json::json!({
            "type": kind, "source": source, "destination": destination, "options": options,
        }))
    }

    /// One more mount in the container, as an OCI spec mount (JSON object with
    /// `type`, `source`, `destination`, `options`).
    pub fn oci_mount(mut self, mount: serde_json::Value) -> Self {
        self.mounts.push(mount);
        self
    }

    /// One label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The runtime: a shim name (`io.containerd.runc.v2`, `io.containerd.keel.v1`)
    /// or a path. By default, keeld's `default_runtime`.
    pub fn runtime(mut self, name: impl Into<String>) -> Self {
        self.runtime = name.into();
        self
    }

    /// runc's options for the container's tasks (`containerd.runc.v1.Options`).
    pub fn runc_options(mut self, options: &RuncOptions) -> Result<Self> {
        self.runtime_options = Some(pack_runc(options)?);
        Ok(self)
    }

    /// Runtime options already packed (any type the runtime takes).
    pub fn runtime_options(mut self, options: Any) -> Self {
        self.runtime_options = Some(options);
        self
    }

    /// A whole OCI spec (JSON) instead of one built from the other settings;
    /// `args`, `env`, `cwd`, `terminal`, `limits` and `mount` are then ignored.
    pub fn oci_spec(mut self, spec_json: Vec<u8>) -> Self {
        self.spec = Some(spec_json);
        self
    }

    /// The OCI spec as JSON.
    pub fn spec_json(&self) -> Result<Vec<u8>> {
        if let Some(s) = &self.spec {
            return Ok(s.clone());
        }
        let mut v = serde_json::to_value(oci_spec::runtime::Spec::default())
            .map_err(|e| Error::Internal(format!("default spec: {e}")))?;
        v["hostname"] = serde_json::json!(self.id);
        let p = &mut v["process"];
        p["args"] = serde_json::json!(self.args);
        p["cwd"] = serde_json::json!(self.cwd);
        p["terminal"] = serde_json::json!(self.terminal);
        let mut env = Vec::new();
        if !self.env.iter().any(|(k, _)| k == "PATH") {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        env.extend(self.env.iter().map(|(k, v)| format!("{k}={v}")));
        p["env"] = serde_json::json!(env);
        v["linux"]["resources"] = self.limits.resources()?;
        v["root"]["readonly"] = serde_json::json!(self.read_only);
        if let Some(all) = v["mounts"].as_array_mut() {
            all.extend(self.mounts.iter().cloned());
        }
        serde_json::to_vec(&v).map_err(|e| Error::Internal(format!("spec: {e}")))
    }

    /// The container as keel's API carries it.
    pub fn to_proto(&self) -> Result<keel_protocol::api::containers::Container> {
        if self.spec.is_none() && self.args.is_empty() {
            return Err(invalid(format!(
                "container {}: args: a command to run is required",
                self.id
            )));
        }
        let rootfs = match &self.rootfs {
            Some(dir) => vec![bind_rootfs(dir, self.read_only)?],
            None => self.rootfs_mounts.clone(),
        };
        Ok(keel_protocol::api::containers::Container {
            id: self.id.clone(),
            labels: self.labels.clone(),
            runtime: MessageField::some(Runtime {
                name: self.runtime.clone(),
                options: self.runtime_options.clone().into(),
                ..Default::default()
            }),
            spec: MessageField::some(json_any(SPEC_TYPE_URL, self.spec_json()?)),
            rootfs,
            ..Default::default()
        })
    }
}

/// A host directory as a root filesystem: an rbind mount, `ro` or `rw`.
pub fn bind_rootfs(dir: &Path, read_only: bool) -> Result<Mount> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| invalid(format!("rootfs {}: {e}", dir.display())))?;
    Ok(Mount {
        type_: "bind".into(),
        source: dir.display().to_string(),
        options: vec!["rbind".into(), if read_only { "ro" } else { "rw" }.into()],
        ..Default::default()
    })
}

/// runc's options packed as containerd packs them (no `type.googleapis.com/`).
pub fn pack_runc(options: &RuncOptions) -> Result<Any> {
    Ok(Any {
        type_url: RUNC_OPTIONS_TYPE_URL.into(),
        value: options.write_to_bytes()?,
        ..Default::default()
    })
}

/// The containers of a client's namespace.
#[derive(Debug, Clone)]
pub struct Containers {
    client: Client,
}

impl Containers {
    pub(crate) fn new(client: Client) -> Self {
        Self { client }
    }

    /// Creates a container (no task yet).
    pub async fn create(&self, spec: ContainerSpec) -> Result<Container> {
        self.create_raw(spec.to_proto()?).await
    }

    /// Creates a container from its API form.
    pub async fn create_raw(
        &self,
        container: keel_protocol::api::containers::Container,
    ) -> Result<Container> {
        let req = CreateContainerRequest {
            container: MessageField::some(container),
            ..Default::default()
        };
        let r = self
            .client
            .call("Containers.Create", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.containers.create(ctx, &req).await }
            })
            .await?;
        Ok(Container::new(
            self.client.clone(),
            r.container.unwrap_or_default(),
        ))
    }

    /// Container `id` (NotFound if there is none).
    pub async fn get(&self, id: &str) -> Result<Container> {
        let req = GetContainerRequest {
            id: id.to_string(),
            ..Default::default()
        };
        let r = self
            .client
            .call("Containers.Get", Retry::Always, |raw, ctx| {
                let req = req.clone();
                async move { raw.containers.get(ctx, &req).await }
            })
            .await?;
        Ok(Container::new(
            self.client.clone(),
            r.container.unwrap_or_default(),
        ))
    }

    /// The containers matching any of `filters` (containerd's filter language,
    /// e.g. `labels."app"==web`); all of them when there are none.
    pub async fn list(&self, filters: &[&str]) -> Result<Vec<Container>> {
        let req = ListContainersRequest {
            filters: filters.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        };
        let r = self
            .client
            .call("Containers.List", Retry::Always, |raw, ctx| {
                let req = req.clone();
                async move { raw.containers.list(ctx, &req).await }
            })
            .await?;
        Ok(r.containers
            .into_iter()
            .map(|c| Container::new(self.client.clone(), c))
            .collect())
    }
}

impl Containers {
    /// Deletes container `id` (FailedPrecondition while it has a task).
    pub async fn delete(&self, id: &str) -> Result<()> {
        let req = DeleteContainerRequest {
            id: id.to_string(),
            ..Default::default()
        };
        self.client
            .call("Containers.Delete", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.containers.delete(ctx, &req).await }
            })
            .await?;
        Ok(())
    }
}

/// A container, as keeld last returned it.
#[derive(Debug, Clone)]
pub struct Container {
    client: Client,
    info: keel_protocol::api::containers::Container,
}

impl Container {
    fn new(client: Client, info: keel_protocol::api::containers::Container) -> Self {
        Self { client, info }
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// The container as keeld returned it (spec, runtime, rootfs, times).
    pub fn info(&self) -> &keel_protocol::api::containers::Container {
        &self.info
    }

    /// Its labels.
    pub fn labels(&self) -> &HashMap<String, String> {
        &self.info.labels
    }

    /// Its OCI spec, parsed.
    pub fn spec(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.info.spec.value).map_err(|e| {
            Error::FailedPrecondition(format!("container {} has no readable spec: {e}", self.id()))
        })
    }

    /// Sets labels (others are kept); returns the container as updated.
    pub async fn set_labels(&mut self, labels: &[(&str, &str)]) -> Result<()> {
        let mut c = keel_protocol::api::containers::Container {
            id: self.info.id.clone(),
            ..Default::default()
        };
        let mut paths = Vec::new();
        for (k, v) in labels {
            c.labels.insert((*k).to_string(), (*v).to_string());
            paths.push(format!("labels.{k}"));
        }
        self.update(c, paths).await
    }

    /// Containers.Update with a field mask (`labels`, `labels.<key>`, `spec`).
    pub async fn update(
        &mut self,
        container: keel_protocol::api::containers::Container,
        paths: Vec<String>,
    ) -> Result<()> {
        let req = UpdateContainerRequest {
            container: MessageField::some(container),
            update_mask: MessageField::some(FieldMask {
                paths,
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .client
            .call("Containers.Update", Retry::Once, |raw, ctx| {
                let req = req.clone();
                async move { raw.containers.update(ctx, &req).await }
            })
            .await?;
        self.info = r.container.unwrap_or_default();
        Ok(())
    }

    /// Deletes the container (FailedPrecondition while it has a task).
    pub async fn delete(&self) -> Result<()> {
        self.client.containers().delete(self.id()).await
    }

    /// Creates the container's task with `io` as its init process's stdio. It is
    /// created, not started: [`Process::start`](crate::Process::start) (or
    /// [`Task::wait_after_start`]).
    pub async fn new_task(&self, io: Io) -> Result<Task> {
        Task::create(self.client.clone(), self.id(), io, TaskOptions::default()).await
    }

    /// [`Container::new_task`] with task options: runtime options, rootfs mounts, a
    /// checkpoint to restore from.
    pub async fn new_task_with(&self, io: Io, options: TaskOptions) -> Result<Task> {
        Task::create(self.client.clone(), self.id(), io, options).await
    }

    /// The container's task, if it has one (NotFound otherwise).
    pub async fn task(&self) -> Result<Task> {
        Task::load(self.client.clone(), self.id()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_carries_what_the_builder_was_given() {
        let s = ContainerSpec::without_rootfs("web")
            .args(["sh", "-c", "true"])
            .env("A", "1")
            .cwd("/srv")
            .read_only(true)
            .mount("tmpfs", "tmpfs", "/scratch", &["nosuid"])
            .limits(Limits {
                pids: Some(10),
                ..Default::default()
            });
        let v: serde_json::Value = serde_json::from_slice(&s.spec_json().unwrap()).unwrap();
        assert_eq!(
            v["process"]["args"],
            serde_json::json!(["sh", "-c", "true"])
        );
        assert_eq!(v["process"]["cwd"], "/srv");
        assert_eq!(v["process"]["env"][1], "A=1");
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["linux"]["resources"]["pids"]["limit"], 10);
        let last = v["mounts"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["destination"], "/scratch");
    }

    #[test]
    fn limits_out_of_range_are_refused_by_name() {
        for (l, name) in [
            (
                Limits {
                    memory_bytes: Some(0),
                    ..Default::default()
                },
                "memory",
            ),
            (
                Limits {
                    cpus: Some(2000.0),
                    ..Default::default()
                },
                "cpus",
            ),
            (
                Limits {
                    pids: Some(-1),
                    ..Default::default()
                },
                "pids",
            ),
        ] {
            let e = l.resources().unwrap_err();
            assert!(
                matches!(&e, Error::InvalidArgument(m) if m.contains(name)),
                "{e}"
            );
        }
    }

    #[test]
    fn a_container_needs_a_command() {
        let e = ContainerSpec::without_rootfs("x").to_proto().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(m) if m.contains("args")));
    }
}

//! `keel.services.containers.v1.Containers`: container metadata in sled.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use keel_actors::events::EventSink;
use keel_actors::runtime_options;
use keel_actors::shim::resolve_runtime;
use keel_actors::task::Tasks;
use keel_protocol::api::containers::{container::Runtime, *};
use keel_protocol::api::containers_ttrpc;
use keel_protocol::api::types::Mount;
use keel_protocol::containerd::events::container as cev;
use keel_protocol::filters::Adaptor;
use keel_protocol::limits::Limits;
use keel_protocol::types::{json_any, pack, timestamp, SPEC_TYPE_URL};
use keel_protocol::{identifiers, validate, Error};
use keel_storage::meta::{from_nanos, nanos, ContainerRecord, MountRecord};
use keel_storage::Meta;
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::asynchronous::TtrpcContext;

use super::{blocking, filters, guarded, Rpc};
use crate::server::Auth;

/// Specs longer than this are checked on the blocking pool: parsing a large one
/// takes milliseconds.
const INLINE_SPEC_BYTES: usize = 64 << 10;

#[derive(Debug)]
pub struct ContainersService {
    pub auth: Arc<Auth>,
    pub meta: Meta,
    pub events: EventSink,
    pub tasks: Tasks,
    pub limits: Arc<Limits>,
    /// The runtime of a container that names none (configuration's `default_runtime`).
    pub default_runtime: String,
}

fn to_proto(c: &ContainerRecord) -> Container {
    Container {
        id: c.id.clone(),
        labels: c.labels.clone().into_iter().collect(),
        runtime: MessageField::some(Runtime {
            name: c.runtime.clone(),
            options: c
                .runtime_options
                .as_ref()
                .map(|(t, v)| Any {
                    type_url: t.clone(),
                    value: v.clone(),
                    ..Default::default()
                })
                .into(),
            ..Default::default()
        }),
        spec: MessageField::some(json_any(SPEC_TYPE_URL, c.spec.clone())),
        rootfs: c
            .rootfs
            .iter()
            .map(|m| Mount {
                type_: m.kind.clone(),
                source: m.source.clone(),
                target: m.target.clone(),
                options: m.options.clone(),
                ..Default::default()
            })
            .collect(),
        created_at: MessageField::some(timestamp(from_nanos(c.created_ns))),
        updated_at: MessageField::some(timestamp(from_nanos(c.updated_ns))),
        ..Default::default()
    }
}

struct ContainerFields<'a>(&'a ContainerRecord);

impl Adaptor for ContainerFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "id" => Some(self.0.id.clone()),
            [f, n] if f == "runtime" && n == "name" => Some(self.0.runtime.clone()),
            [f] if f == "labels" => (!self.0.labels.is_empty()).then(String::new),
            [f, k] if f == "labels" => self.0.labels.get(k).cloned(),
            _ => None,
        }
    }
}

/// Checks a container's spec; a large one on the blocking pool.
async fn spec(any: Option<Any>, limits: &Limits) -> ttrpc::Result<Vec<u8>> {
    if any
        .as_ref()
        .is_none_or(|a| a.value.len() <= INLINE_SPEC_BYTES)
    {
        return validate::spec("container.spec", any.as_ref(), limits).rpc();
    }
    let limits = limits.clone();
    blocking(move || validate::spec("container.spec", any.as_ref(), &limits)).await
}

/// Checks rootfs mounts given in `field` (a container's, or a task's own).
pub(super) fn validate_rootfs(
    field: &str,
    mounts: &[Mount],
    limits: &Limits,
) -> Result<Vec<MountRecord>, Error> {
    if mounts.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{field} is required (a directory or mounts)"
        )));
    }
    validate::mounts(field, mounts, limits)?;
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if m.type_ == "bind" && !std::path::Path::new(&m.source).is_dir() {
                return Err(Error::InvalidArgument(format!(
                    "{field}[{i}].source {:?} is not a directory",
                    m.source
                )));
            }
            Ok(MountRecord {
                kind: m.type_.clone(),
                source: m.source.clone(),
                target: m.target.clone(),
                options: m.options.clone(),
            })
        })
        .collect()
}

impl ContainersService {
    /// The container `id` of namespace `ns`, or NotFound.
    async fn load(&self, ns: &str, id: &str) -> ttrpc::Result<ContainerRecord> {
        let (meta, ns2, id2) = (self.meta.clone(), ns.to_string(), id.to_string());
        blocking(move || meta.container(&ns2, &id2))
            .await?
            .ok_or_else(|| Error::NotFound(format!("container {id} not found")))
            .rpc()
    }

    /// Publishes a container event and waits for it to be on disk, which also makes
    /// the record change just written durable.
    async fn publish_container(
        &self,
        ns: &str,
        topic: &str,
        c: &ContainerRecord,
    ) -> ttrpc::Result<()> {
        let any = match topic {
            "/containers/create" => pack(&cev::ContainerCreate {
                id: c.id.clone(),
                runtime: MessageField::some(cev::container_create::Runtime {
                    name: c.runtime.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "/containers/update" => pack(&cev::ContainerUpdate {
                id: c.id.clone(),
                labels: c.labels.clone().into_iter().collect(),
                ..Default::default()
            }),
            _ => pack(&cev::ContainerDelete {
                id: c.id.clone(),
                ..Default::default()
            }),
        };
        let delivered = any
            .and_then(|any| {
                self.events
                    .publish(ns, topic, any, None)
                    .map_err(Error::from)
            })
            .rpc()?;
        delivered.await;
        Ok(())
    }
}

#[async_trait::async_trait]
impl containers_ttrpc::Containers for ContainersService {
    async fn get(
        &self,
        ctx: &TtrpcContext,
        req: GetContainerRequest,
    ) -> ttrpc::Result<GetContainerResponse> {
        guarded("Containers.Get", async move {
            let ns = self.auth.request(ctx, "Containers.Get").rpc()?.namespace;
            identifiers::validate("id", &req.id).rpc()?;
            let c = self.load(&ns, &req.id).await?;
            Ok(GetContainerResponse {
                container: MessageField::some(to_proto(&c)),
                ..Default::default()
            })
        })
        .await
    }

    async fn list(
        &self,
        ctx: &TtrpcContext,
        req: ListContainersRequest,
    ) -> ttrpc::Result<ListContainersResponse> {
        guarded("Containers.List", async move {
            let ns = self.auth.request(ctx, "Containers.List").rpc()?.namespace;
            let filter = filters(req.filters, &self.limits).await?;
            let meta = self.meta.clone();
            let all = blocking(move || meta.containers(&ns)).await?;
            let containers = all
                .iter()
                .filter(|c| filter.matches(&ContainerFields(c)))
                .map(to_proto)
                .collect();
            Ok(ListContainersResponse {
                containers,
                ..Default::default()
            })
        })
        .await
    }

    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        guarded("Containers.Create", async move {
            let ns = self.auth.request(ctx, "Containers.Create").rpc()?.namespace;
            let c = validate::required("container", req.container).rpc()?;
            identifiers::validate("container.id", &c.id).rpc()?;
            validate::labels("container.labels", &c.labels, &self.limits).rpc()?;
            let spec = spec(c.spec.clone().into_option(), &self.limits).await?;
            let rootfs = validate_rootfs("container.rootfs", &c.rootfs, &self.limits).rpc()?;
            if let Some(r) = c.runtime.as_ref() {
                validate::path("container.runtime.name", &r.name, &self.limits).rpc()?;
                if let Some(o) = r.options.as_ref() {
                    validate::options("container.runtime.options", o, &self.limits).rpc()?;
                    let checked =
                        runtime_options::check("container.runtime.options", &o.type_url, &o.value)
                            .map_err(keel_protocol::Error::from)
                            .rpc()?;
                    // As in containerd, only a task's own options name the image it
                    // is restored from.
                    if !checked.criu_image_path.is_empty() {
                        return Err(Error::InvalidArgument(
                            "container.runtime.options.criu_image_path: give it in the task's options (CreateTaskRequest.options), which name the image a task is restored from".into(),
                        )
                        .into());
                    }
                }
            }
            let runtime = c
                .runtime
                .as_ref()
                .map(|r| r.name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| self.default_runtime.clone());
            resolve_runtime(&runtime)
                .map_err(keel_protocol::Error::from)
                .rpc()?;
            let now = nanos(SystemTime::now());
            let rec = ContainerRecord {
                id: c.id.clone(),
                labels: c.labels.into_iter().collect::<BTreeMap<_, _>>(),
                runtime,
                runtime_options: c
                    .runtime
                    .as_ref()
                    .and_then(|r| r.options.as_ref())
                    .map(|a| (a.type_url.clone(), a.value.clone())),
                spec,
                rootfs,
                created_ns: now,
                updated_ns: now,
            };
            let (meta, ns2, r2) = (self.meta.clone(), ns.clone(), rec.clone());
            blocking(move || meta.create_container(&ns2, &r2)).await?;
            self.publish_container(&ns, "/containers/create", &rec)
                .await?;
            Ok(CreateContainerResponse {
                container: MessageField::some(to_proto(&rec)),
                ..Default::default()
            })
        })
        .await
    }

    async fn update(
        &self,
        ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<UpdateContainerResponse> {
        guarded("Containers.Update", async move {
            let ns = self.auth.request(ctx, "Containers.Update").rpc()?.namespace;
            let c = validate::required("container", req.container)
                .rpc()?;
            identifiers::validate("container.id", &c.id).rpc()?;
            validate::labels("container.labels", &c.labels, &self.limits).rpc()?;
            let old = self.load(&ns, &c.id).await?;
            let mut rec = old.clone();
            let paths = req
                .update_mask
                .into_option()
                .map(|m| m.paths)
                .unwrap_or_default();
            let all = paths.is_empty();
            for p in if all {
                vec!["labels".to_string(), "spec".to_string()]
            } else {
                paths
            } {
                match p.as_str() {
                    "labels" => rec.labels = c.labels.clone().into_iter().collect(),
                    "spec" if c.spec.is_some() || !all => {
                        rec.spec = spec(c.spec.clone().into_option(), &self.limits).await?
                    }
                    "spec" => {}
                    other => match other.strip_prefix("labels.") {
                        Some(k) => match c.labels.get(k) {
                            Some(v) => {
                                rec.labels.insert(k.to_string(), v.clone());
                            }
                            None => {
                                rec.labels.remove(k);
                            }
                        },
                        None => {
                            return Err(Error::InvalidArgument(format!(
                                "update_mask path {other:?} cannot be updated; use labels, labels.<key> or spec"
                            ))
                            .into())
                        }
                    },
                }
            }
            if rec.labels.len() > self.limits.labels_per_object {
                return Err(Error::InvalidArgument(format!(
                    "container.labels: the update leaves {} labels, the limit is {}",
                    rec.labels.len(),
                    self.limits.labels_per_object
                ))
                .into());
            }
            rec.updated_ns = nanos(SystemTime::now());
            let (meta, ns2, r2) = (self.meta.clone(), ns.clone(), rec.clone());
            blocking(move || meta.update_container(&ns2, &old, &r2)).await?;
            self.publish_container(&ns, "/containers/update", &rec)
                .await?;
            Ok(UpdateContainerResponse {
                container: MessageField::some(to_proto(&rec)),
                ..Default::default()
            })
        })
        .await
    }

    async fn delete(
        &self,
        ctx: &TtrpcContext,
        req: DeleteContainerRequest,
    ) -> ttrpc::Result<Empty> {
        guarded("Containers.Delete", async move {
            let ns = self.auth.request(ctx, "Containers.Delete").rpc()?.namespace;
            identifiers::validate("id", &req.id).rpc()?;
            // Holding the task's id keeps a task from being created meanwhile.
            let _no_task = self.tasks.reserve(&ns, &req.id).map_err(|_| {
                Error::FailedPrecondition(format!(
                    "container {} has a task; delete the task first",
                    req.id
                ))
            });
            let _no_task = _no_task.rpc()?;
            let rec = self.load(&ns, &req.id).await?;
            let (meta, ns2, id) = (self.meta.clone(), ns.clone(), req.id.clone());
            blocking(move || meta.delete_container(&ns2, &id)).await?;
            self.publish_container(&ns, "/containers/delete", &rec)
                .await?;
            Ok(Empty::new())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootfs_must_exist_and_is_bounded() {
        let m = Mount {
            type_: "bind".into(),
            source: "/nonexistent/rootfs".into(),
            ..Default::default()
        };
        let e = validate_rootfs("container.rootfs", &[m], &Limits::default()).unwrap_err();
        assert!(e.message().contains("rootfs[0].source"), "{e}");
        assert!(validate_rootfs("container.rootfs", &[], &Limits::default()).is_err());
        let many = vec![
            Mount {
                type_: "tmpfs".into(),
                ..Default::default()
            };
            65
        ];
        let e = validate_rootfs("container.rootfs", &many, &Limits::default()).unwrap_err();
        assert!(e.message().contains("65 mounts"), "{e}");
    }
}

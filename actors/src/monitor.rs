//! The monitor actor: the one publisher of task events.
//!
//! Task actors report what happened to their task; the monitor records every exit
//! durably (sled, flushed) *before* publishing it, and publishes each exit once per
//! (task, exec id) however many ways it was learned (Wait returning, the shim's
//! forwarded event, the shim's death). Messages are handled in arrival order and an
//! exit is handled atomically, so a task's events leave in the order its actor sent
//! them: create, start, exit, delete.

use std::future::Future;

use actix::prelude::*;
use keel_protocol::containerd::events::task as ev;
use keel_protocol::types::{pack, timestamp};
use keel_storage::meta::{from_nanos, ExitRecord};
use keel_storage::Meta;
use protobuf::well_known_types::any::Any;
use protobuf::MessageField;
use tokio::sync::oneshot;

use crate::events::{Delivered, EventSink};
use crate::{Error, Result};

struct MonitorActor {
    meta: Meta,
    events: EventSink,
}

impl Actor for MonitorActor {
    type Context = Context<Self>;
}

/// Publish a task event; `done` hears its sequence number once it is delivered.
#[derive(Message)]
#[rtype(result = "()")]
struct Publish {
    namespace: String,
    topic: String,
    event: Any,
    done: oneshot::Sender<Result<u64>>,
}

impl Handler<Publish> for MonitorActor {
    type Result = ();

    fn handle(&mut self, m: Publish, _: &mut Self::Context) {
        match self.events.publish(&m.namespace, &m.topic, m.event, None) {
            Ok(delivered) => {
                tokio::spawn(async move {
                    let _ = m.done.send(Ok(delivered.await));
                });
            }
            Err(e) => {
                tracing::error!(topic = %m.topic, error = %e, "publishing an event failed");
                let _ = m.done.send(Err(e));
            }
        }
    }
}

/// Record an exit and publish it if it is new; answers with the exit that stands
/// (this one, or the one recorded first).
#[derive(Message)]
#[rtype(result = "Result<ExitRecord>")]
struct Exit {
    namespace: String,
    record: ExitRecord,
}

impl Handler<Exit> for MonitorActor {
    type Result = ResponseFuture<Result<ExitRecord>>;

    fn handle(&mut self, m: Exit, _: &mut Self::Context) -> Self::Result {
        let mut ours = m.record.clone();
        let published = publish_exit(&self.events, &m.namespace, m.record, |r| {
            ours.seq = r.seq;
            // The compare-and-swap does not wait for the disk; the exit event's flush,
            // which follows it in the same database, makes both durable before either
            // is seen. A crash can still leave one on disk without the other:
            // `reconcile_log` settles that at the next start.
            self.meta.record_exit(&m.namespace, r)
        });
        let earlier = match published {
            Ok(Some(delivered)) => {
                return Box::pin(async move {
                    delivered.await;
                    Ok(ours)
                })
            }
            Ok(None) => self
                .meta
                .exit(&m.namespace, &ours.container_id, &ours.exec_id)
                .map(|r| r.unwrap_or(ours))
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        Box::pin(async move { earlier })
    }
}

pub(crate) fn exit_event(r: &ExitRecord) -> ev::TaskExit {
    ev::TaskExit {
        container_id: r.container_id.clone(),
        id: if r.exec_id.is_empty() {
            r.container_id.clone()
        } else {
            r.exec_id.clone()
        },
        pid: r.pid,
        exit_status: r.exit_status,
        exited_at: MessageField::some(timestamp(from_nanos(r.exited_ns))),
        ..Default::default()
    }
}

/// Publishes `/tasks/exit` for `record` if `store` (given the record with the event's
/// sequence number) says so; `store` runs under the exchange's lock.
pub(crate) fn publish_exit(
    events: &EventSink,
    namespace: &str,
    mut record: ExitRecord,
    store: impl FnOnce(&ExitRecord) -> keel_storage::Result<bool>,
) -> Result<Option<Delivered>> {
    let any = pack(&exit_event(&record))?;
    events.publish_if(namespace, "/tasks/exit", any, None, |seq| {
        record.seq = seq;
        Ok(store(&record)?)
    })
}

/// keel's handle on the monitor. Cheap to clone.
#[derive(Clone)]
pub struct MonitorHandle {
    addr: Addr<MonitorActor>,
}

impl std::fmt::Debug for MonitorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MonitorHandle")
    }
}

impl MonitorHandle {
    /// Starts the monitor on the current arbiter.
    pub fn start(meta: Meta, events: EventSink) -> Self {
        Self {
            addr: MonitorActor { meta, events }.start(),
        }
    }

    /// Publishes a task event after everything queued before it. The event's place in
    /// the sequence is fixed now; the returned future, which may be dropped, resolves
    /// with its sequence number once it is delivered (on disk, for task events).
    pub fn publish(
        &self,
        namespace: &str,
        topic: &str,
        event: Any,
    ) -> impl Future<Output = Result<u64>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        self.addr.do_send(Publish {
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event,
            done,
        });
        async move { rx.await.map_err(|_| Error::ActorGone("monitor"))? }
    }

    /// Records an exit durably, then publishes it unless it was already recorded.
    /// Returns the exit that stands: this one if it was the first report, else the
    /// one recorded earlier.
    pub async fn exit(&self, namespace: &str, record: ExitRecord) -> Result<ExitRecord> {
        self.addr
            .send(Exit {
                namespace: namespace.to_string(),
                record,
            })
            .await
            .map_err(|_| Error::ActorGone("monitor"))?
    }
}

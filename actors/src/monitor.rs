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

use crate::events::EventSink;
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

/// Record an exit and publish it if it is new; answers whether it was.
#[derive(Message)]
#[rtype(result = "Result<bool>")]
struct Exit {
    namespace: String,
    record: ExitRecord,
}

impl Handler<Exit> for MonitorActor {
    type Result = ResponseFuture<Result<bool>>;

    fn handle(&mut self, m: Exit, _: &mut Self::Context) -> Self::Result {
        // The compare-and-swap does not wait for the disk; the exit event's flush,
        // which follows it in the same database, makes both durable before either
        // is seen.
        let fresh = match self.meta.record_exit(&m.namespace, &m.record) {
            Ok(fresh) => fresh,
            Err(e) => return Box::pin(async move { Err(e.into()) }),
        };
        if !fresh {
            return Box::pin(async { Ok(false) });
        }
        let r = &m.record;
        let event = ev::TaskExit {
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
        };
        let published = pack(&event)
            .map_err(Error::from)
            .and_then(|any| self.events.publish(&m.namespace, "/tasks/exit", any, None));
        Box::pin(async move {
            published?.await;
            Ok(true)
        })
    }
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
    /// Returns whether this report was the first.
    pub async fn exit(&self, namespace: &str, record: ExitRecord) -> Result<bool> {
        self.addr
            .send(Exit {
                namespace: namespace.to_string(),
                record,
            })
            .await
            .map_err(|_| Error::ActorGone("monitor"))?
    }
}

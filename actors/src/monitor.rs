//! The monitor actor: the one publisher of task events.
//!
//! Task actors report what happened to their task; the monitor records every exit
//! durably (sled, flushed) *before* publishing it, and publishes each exit once per
//! (task, exec id) however many ways it was learned (Wait returning, the shim's
//! forwarded event, the shim's death). Messages are handled in arrival order and an
//! exit is handled atomically, so a task's events leave in the order its actor sent
//! them: create, start, exit, delete.

use actix::prelude::*;
use keel_protocol::containerd::events::task as ev;
use keel_protocol::types::{pack, timestamp};
use keel_storage::meta::{from_nanos, ExitRecord};
use keel_storage::Meta;
use protobuf::well_known_types::any::Any;
use protobuf::MessageField;

use crate::events::EventSink;
use crate::{Error, Result};

struct MonitorActor {
    meta: Meta,
    events: EventSink,
}

impl Actor for MonitorActor {
    type Context = Context<Self>;
}

/// Publish a task event now.
#[derive(Message)]
#[rtype(result = "()")]
struct Publish {
    namespace: String,
    topic: String,
    event: Any,
}

impl Handler<Publish> for MonitorActor {
    type Result = ();

    fn handle(&mut self, m: Publish, _: &mut Self::Context) {
        self.events.publish(&m.namespace, &m.topic, m.event);
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
    type Result = AtomicResponse<Self, Result<bool>>;

    fn handle(&mut self, m: Exit, _: &mut Self::Context) -> Self::Result {
        let meta = self.meta.clone();
        let (ns, rec) = (m.namespace.clone(), m.record.clone());
        // sled's flush blocks: keep it off the arbiter thread.
        let record = async move {
            tokio::task::spawn_blocking(move || meta.record_exit(&ns, &rec))
                .await
                .map_err(|e| Error::Io(format!("blocking task: {e}")))?
                .map_err(Error::from)
        };
        AtomicResponse::new(Box::pin(record.into_actor(self).map(
            move |fresh, act, _| {
                if let Ok(true) = fresh {
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
                    if let Ok(any) = pack(&event) {
                        act.events.publish(&m.namespace, "/tasks/exit", any);
                    }
                }
                fresh
            },
        )))
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

    /// Queues a task event for publication, after everything queued before it.
    pub fn publish(&self, namespace: &str, topic: &str, event: Any) {
        self.addr.do_send(Publish {
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event,
        });
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

//! The monitor actor: the one publisher of task events.
//!
//! Task actors report what happened to their task; the monitor records every exit
//! durably (sled, flushed) *before* publishing it, and publishes each exit once per
//! (task, exec id) however many ways it was learned (Wait returning, the shim's
//! forwarded event, the shim's death). Messages are handled in arrival order and an
//! exit is handled atomically, so a task's events leave in the order its actor sent
//! them: create, start, exit, delete.
//!
//! The monitor holds no state of its own (the records are in sled, the events in
//! the exchange), so its supervisor restarts it one-for-one when it fails: the
//! handle's address moves to the new actor; what was published while none ran
//! waits in the handle and goes first; a publication or exit whose message the
//! failed actor never handled is sent again (an exit is recorded with a
//! compare-and-swap, so a second try never records or publishes it twice).

use std::future::Future;

use actix::prelude::*;
use keel_protocol::containerd::events::task as ev;
use keel_protocol::types::{pack, timestamp};
use keel_storage::meta::{from_nanos, ExitRecord};
use keel_storage::Meta;
use protobuf::well_known_types::any::Any;
use protobuf::MessageField;
use tokio::sync::oneshot;

use tokio::sync::mpsc;

use crate::events::{Delivered, EventSink};
use crate::supervision::{Death, Lifeline, Revivable};
use crate::{Error, Result};

struct MonitorActor {
    meta: Meta,
    events: EventSink,
    /// Reports a failure to the monitor's supervisor.
    _lifeline: Lifeline<&'static str>,
}

impl Actor for MonitorActor {
    type Context = Context<Self>;
}

/// Fault injection (tests only): a named message makes the monitor panic or stall.
fn fault(message: &str, ctx: &mut Context<MonitorActor>) {
    #[cfg(feature = "faults")]
    if let Some(keel_storage::faults::Fault::Stall(d)) =
        keel_storage::faults::check(&format!("monitor:{message}"))
    {
        ctx.wait(actix::fut::wrap_future(actix::clock::sleep(d)));
    }
    #[cfg(not(feature = "faults"))]
    let _ = (message, ctx);
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

    fn handle(&mut self, m: Publish, ctx: &mut Self::Context) {
        fault("Publish", ctx);
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

    fn handle(&mut self, m: Exit, ctx: &mut Self::Context) -> Self::Result {
        fault("Exit", ctx);
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

/// How long a caller waits for a failed monitor to be brought back.
const REVIVE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct Shared {
    meta: Meta,
    events: EventSink,
    actor: Revivable<MonitorActor>,
    deaths: mpsc::UnboundedSender<Death<&'static str>>,
    /// Publications made while no monitor ran, in order; the next one takes them
    /// first.
    pending: std::sync::Mutex<Vec<Publish>>,
}

/// keel's handle on the monitor. Cheap to clone; clones share the monitor, and
/// stay valid when its supervisor replaces it.
#[derive(Clone)]
pub struct MonitorHandle {
    shared: std::sync::Arc<Shared>,
}

impl std::fmt::Debug for MonitorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MonitorHandle")
    }
}

impl MonitorHandle {
    /// Starts the monitor on the current arbiter; its failures are reported on
    /// `deaths` (as `"monitor"`).
    pub fn start(
        meta: Meta,
        events: EventSink,
        deaths: mpsc::UnboundedSender<Death<&'static str>>,
    ) -> Self {
        let h = Self {
            shared: std::sync::Arc::new(Shared {
                meta,
                events,
                actor: Revivable::default(),
                deaths,
                pending: std::sync::Mutex::default(),
            }),
        };
        h.restart();
        h
    }

    /// Starts a new monitor in place of one that failed (or the first): it takes
    /// the publications that waited meanwhile, in order, before anything newer.
    pub fn restart(&self) {
        let s = &self.shared;
        let addr = MonitorActor {
            meta: s.meta.clone(),
            events: s.events.clone(),
            _lifeline: Lifeline::new("monitor", s.deaths.clone()),
        }
        .start();
        let waiting = std::mem::take(&mut *s.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for m in waiting {
            addr.do_send(m);
        }
        s.actor.started(addr);
    }

    /// Hands a publication to the monitor, or keeps it for the next one if none runs.
    fn enqueue(&self, m: Publish) {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let m = match self.shared.actor.addr() {
            // Behind what waits already, to keep the order.
            Some(addr) if pending.is_empty() => match addr.try_send(m) {
                Ok(()) => return,
                Err(SendError::Full(m) | SendError::Closed(m)) => m,
            },
            _ => m,
        };
        pending.push(m);
    }

    /// Publishes a task event after everything queued before it. The event's place in
    /// the sequence is fixed now; the returned future, which may be dropped, resolves
    /// with its sequence number once it is delivered (on disk, for task events). If
    /// the monitor fails before it handles the event, the future (when polled)
    /// publishes it again through the monitor that replaces it.
    pub fn publish(
        &self,
        namespace: &str,
        topic: &str,
        event: Any,
    ) -> impl Future<Output = Result<u64>> + Send + 'static {
        let send = {
            let (h, namespace, topic) = (self.clone(), namespace.to_string(), topic.to_string());
            move |event: Any| {
                let (done, rx) = oneshot::channel();
                h.enqueue(Publish {
                    namespace: namespace.clone(),
                    topic: topic.clone(),
                    event,
                    done,
                });
                rx
            }
        };
        let first = send(event.clone());
        let h = self.clone();
        async move {
            let seen = h.shared.actor.generation();
            match first.await {
                Ok(r) => r,
                // The monitor went before handling it: once more, to the next one.
                Err(_) if h.shared.actor.next_life(seen, REVIVE_WAIT).await => {
                    send(event).await.map_err(|_| Error::ActorGone("monitor"))?
                }
                Err(_) => Err(Error::ActorGone("monitor")),
            }
        }
    }

    /// Records an exit durably, then publishes it unless it was already recorded.
    /// Returns the exit that stands: this one if it was the first report, else the
    /// one recorded earlier. Made again on the next monitor if this one fails.
    pub async fn exit(&self, namespace: &str, record: ExitRecord) -> Result<ExitRecord> {
        for _ in 0..2 {
            let addr = self
                .shared
                .actor
                .live(REVIVE_WAIT)
                .await
                .ok_or(Error::ActorGone("monitor"))?;
            let seen = self.shared.actor.generation();
            match addr
                .send(Exit {
                    namespace: namespace.to_string(),
                    record: record.clone(),
                })
                .await
            {
                Ok(r) => return r,
                Err(_) => {
                    self.shared.actor.next_life(seen, REVIVE_WAIT).await;
                }
            }
        }
        Err(Error::ActorGone("monitor"))
    }
}

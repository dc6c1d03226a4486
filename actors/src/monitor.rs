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
use keel_protocol::types::{pack, system_time, timestamp, unpack};
use keel_storage::meta::{from_nanos, nanos, ExitRecord};
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
            // `reconcile_exits` settles that at the next start.
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

fn exit_event(r: &ExitRecord) -> ev::TaskExit {
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
fn publish_exit(
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

/// What [`reconcile_exits`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Exits whose event was logged but whose record was lost, now recorded.
    pub recorded: usize,
    /// Exits whose record was kept but whose event was lost, now published.
    pub republished: usize,
}

/// Makes exit records and logged `/tasks/exit` events agree after a crash, before any
/// task is restored. A record and its event reach the disk in separate writes; a
/// crash between them leaves either an event nobody recorded (the restored task
/// would publish its exit a second time) or a record whose event never reached the
/// log (its exit would never be published). The first gets its record back from the
/// event; the second gets its event published now.
/// Resolves once the events it published are delivered.
/// The same pass over the log also tells which tasks' create and start it holds
/// ([`LoggedLifecycle`]), for the restore that follows.
pub async fn reconcile_exits(
    meta: &Meta,
    events: &EventSink,
) -> Result<(Reconciled, LoggedLifecycle)> {
    use std::collections::{HashMap, HashSet};

    let (trimmed_upto, retained) = events.retained();
    let mut lifecycle = LoggedLifecycle {
        retained_since_ns: (trimmed_upto > 0).then(|| {
            retained
                .first()
                .and_then(|e| e.timestamp.as_ref())
                .map_or(u64::MAX, |t| nanos(system_time(t)))
        }),
        ..LoggedLifecycle::default()
    };
    // The newest logged exit of every process of every task's current incarnation: a
    // create or delete starts a task afresh, and adding an exec process starts that
    // process afresh (a deleted exec's id may be used again).
    type Key = (String, String, String);
    let mut logged: HashMap<Key, (u64, ev::TaskExit)> = HashMap::new();
    let mut logged_seqs = HashSet::new();
    for env in &retained {
        let payload = env.event.get_or_default();
        match env.topic.as_str() {
            "/tasks/exit" => {
                let Ok(e) = unpack::<ev::TaskExit>(payload) else {
                    continue;
                };
                logged_seqs.insert(env.sequence);
                let exec = if e.id == e.container_id {
                    String::new()
                } else {
                    e.id.clone()
                };
                logged.insert(
                    (env.namespace.clone(), e.container_id.clone(), exec),
                    (env.sequence, e),
                );
            }
            "/tasks/exec-added" => {
                if let Ok(e) = unpack::<ev::TaskExecAdded>(payload) {
                    logged.remove(&(env.namespace.clone(), e.container_id, e.exec_id));
                }
            }
            "/tasks/create" | "/tasks/delete" => {
                let create = env.topic == "/tasks/create";
                let id = if create {
                    unpack::<ev::TaskCreate>(payload).map(|e| e.container_id)
                } else {
                    unpack::<ev::TaskDelete>(payload).map(|e| e.container_id)
                };
                if let Ok(id) = id {
                    logged.retain(|(ns, cid, _), _| !(ns == &env.namespace && cid == &id));
                    let key = (env.namespace.clone(), id);
                    if create {
                        lifecycle.tasks.entry(key).or_default().0 = true;
                    } else {
                        lifecycle.tasks.remove(&key);
                    }
                }
            }
            "/tasks/start" => {
                if let Ok(e) = unpack::<ev::TaskStart>(payload) {
                    let key = (env.namespace.clone(), e.container_id);
                    lifecycle.tasks.entry(key).or_default().1 = true;
                }
            }
            _ => {}
        }
    }

    let mut done = Reconciled::default();
    let mut delivered = Vec::new();
    for ((ns, cid, exec), (seq, e)) in &logged {
        // The task, or the exec process, was deleted since.
        if meta.task(ns, cid)?.is_none()
            || (!exec.is_empty() && meta.exec(ns, cid, exec)?.is_none())
        {
            continue;
        }
        let recorded = meta.exit(ns, cid, exec)?;
        if recorded.as_ref().is_some_and(|r| r.seq == *seq) {
            continue;
        }
        let record = ExitRecord {
            container_id: cid.clone(),
            exec_id: exec.clone(),
            pid: e.pid,
            exit_status: e.exit_status,
            exited_ns: e.exited_at.as_ref().map_or(0, |t| nanos(system_time(t))),
            seq: *seq,
        };
        tracing::warn!(namespace = %ns, task_id = %cid, seq, "recovered the record of a published exit");
        meta.put_exit(ns, &record)?;
        done.recorded += 1;
    }
    for (ns, r) in meta.all_exits()? {
        // 0: recorded before exits named their events; nothing to compare.
        if r.seq == 0 || r.seq <= trimmed_upto || logged_seqs.contains(&r.seq) {
            continue;
        }
        tracing::warn!(namespace = %ns, task_id = %r.container_id, lost_seq = r.seq, "publishing an exit whose event was lost");
        let ns2 = ns.clone();
        let published = publish_exit(events, &ns, r, |r| {
            meta.put_exit(&ns2, r)?;
            Ok(true)
        })?;
        delivered.extend(published);
        done.republished += 1;
    }
    meta.flush()?;
    for d in delivered {
        d.await;
    }
    Ok((done, lifecycle))
}

/// Which lifecycle events of each task's current incarnation the event log holds,
/// so that a restore can publish those a crash kept from the log. Read by
/// [`reconcile_exits`].
#[derive(Debug, Default)]
pub struct LoggedLifecycle {
    /// Timestamp (ns) of the oldest retained event, when retention has dropped
    /// some: a task created before it may have had its events dropped, not lost.
    pub retained_since_ns: Option<u64>,
    /// By namespace and task id: whether `/tasks/create` and `/tasks/start` are
    /// logged since the task's last `/tasks/delete`.
    pub tasks: std::collections::HashMap<(String, String), (bool, bool)>,
}

impl LoggedLifecycle {
    /// For a task created at `created_ns`: whether its `/tasks/create` and
    /// `/tasks/start` are missing from the log (never both a drop by retention).
    pub fn missing(&self, ns: &str, id: &str, created_ns: u64) -> (bool, bool) {
        if self
            .retained_since_ns
            .is_some_and(|since| created_ns < since)
        {
            return (false, false);
        }
        let (create, start) = self
            .tasks
            .get(&(ns.to_string(), id.to_string()))
            .copied()
            .unwrap_or_default();
        (!create, !start)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventOptions;
    use keel_storage::meta::{ExecRecord, TaskRecord};

    fn open(dir: &std::path::Path) -> (Meta, EventSink) {
        // A reopen waits for the exchange's flusher thread to let go of the last one.
        let mut tries = 0;
        let db = loop {
            match keel_storage::open_db(dir) {
                Ok(db) => break db,
                Err(e) if tries < 100 => {
                    tries += 1;
                    eprintln!("reopen: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let meta = Meta::open(db.clone()).unwrap();
        let events = EventSink::open(&dir.join("events"), db, EventOptions::default()).unwrap();
        (meta, events)
    }

    fn task(meta: &Meta, id: &str) {
        let t = TaskRecord {
            id: id.into(),
            bundle: String::new(),
            shim_address: String::new(),
            shim_pid: 1,
            pid: 2,
            stdin: String::new(),
            stdout: String::new(),
            stderr: String::new(),
            terminal: false,
            log_path: None,
            created_ns: 1,
            started: true,
        };
        meta.put_task("ns", &t).unwrap();
    }

    fn exit(id: &str, status: u32) -> ExitRecord {
        ExitRecord {
            container_id: id.into(),
            exec_id: String::new(),
            pid: 2,
            exit_status: status,
            exited_ns: 1_000_000_007,
            seq: 0,
        }
    }

    fn logged_exits(events: &EventSink, id: &str) -> Vec<u32> {
        events
            .retained()
            .1
            .iter()
            .filter(|e| e.topic == "/tasks/exit")
            .filter_map(|e| unpack::<ev::TaskExit>(e.event.get_or_default()).ok())
            .filter(|e| e.container_id == id)
            .map(|e| e.exit_status)
            .collect()
    }

    #[actix_rt::test]
    async fn a_logged_exit_without_its_record_is_recorded_not_republished() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        task(&meta, "t");
        // As if keeld died after the event reached the log but before the record did.
        let seq = events
            .publish(
                "ns",
                "/tasks/exit",
                pack(&exit_event(&exit("t", 7))).unwrap(),
                None,
            )
            .unwrap()
            .await;
        let done = reconcile_exits(&meta, &events).await.unwrap().0;
        assert_eq!(
            done,
            Reconciled {
                recorded: 1,
                republished: 0
            }
        );
        let r = meta.exit("ns", "t", "").unwrap().unwrap();
        assert_eq!((r.seq, r.exit_status, r.pid), (seq, 7, 2));
        assert_eq!(r.exited_ns, 1_000_000_007);
        assert_eq!(
            reconcile_exits(&meta, &events).await.unwrap().0,
            Reconciled::default()
        );
        // The restored task's own report of that exit is now a duplicate.
        let standing = MonitorHandle::start(meta.clone(), events.clone())
            .exit("ns", exit("t", 137))
            .await
            .unwrap();
        assert_eq!(standing.exit_status, 7, "the first exit stands");
        assert_eq!(logged_exits(&events, "t").len(), 1);
    }

    #[tokio::test]
    async fn a_recorded_exit_whose_event_was_lost_is_published_once() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        task(&meta, "t");
        // The record names the number its event would have had; the event is lost.
        let mut lost = 0;
        events
            .publish_if("ns", "/tasks/exit", Any::new(), None, |seq| {
                lost = seq;
                Ok(false)
            })
            .unwrap();
        meta.record_exit(
            "ns",
            &ExitRecord {
                seq: lost,
                ..exit("t", 3)
            },
        )
        .unwrap();
        meta.flush().unwrap();
        drop(events);
        drop(meta);
        let (meta, events) = open(dir.path());
        let done = reconcile_exits(&meta, &events).await.unwrap().0;
        assert_eq!(
            done,
            Reconciled {
                recorded: 0,
                republished: 1
            }
        );
        assert_eq!(logged_exits(&events, "t"), vec![3]);
        let r = meta.exit("ns", "t", "").unwrap().unwrap();
        assert!(r.seq > 0 && r.seq != lost, "the record names the new event");
        assert_eq!(
            reconcile_exits(&meta, &events).await.unwrap().0,
            Reconciled::default()
        );
        // Reopened (the republished event and the record's new number are durable).
        drop(events);
        drop(meta);
        let (meta, events) = open(dir.path());
        assert_eq!(
            reconcile_exits(&meta, &events).await.unwrap().0,
            Reconciled::default()
        );
        assert_eq!(logged_exits(&events, "t"), vec![3]);
    }

    #[tokio::test]
    async fn exec_exits_count_only_for_the_exec_process_that_exists_now() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        task(&meta, "t");
        let exec_exit = |exec_id: &str, status| ExitRecord {
            exec_id: exec_id.into(),
            ..exit("t", status)
        };
        let added = |exec_id: &str| ev::TaskExecAdded {
            container_id: "t".into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let record = |exec_id: &str| ExecRecord {
            exec_id: exec_id.into(),
            pid: 2,
            started: true,
            stdin: String::new(),
            stdout: String::new(),
            stderr: String::new(),
            terminal: false,
        };
        for exec_id in ["kept", "deleted", "again"] {
            events
                .publish(
                    "ns",
                    "/tasks/exec-added",
                    pack(&added(exec_id)).unwrap(),
                    None,
                )
                .unwrap()
                .await;
            events
                .publish(
                    "ns",
                    "/tasks/exit",
                    pack(&exit_event(&exec_exit(exec_id, 3))).unwrap(),
                    None,
                )
                .unwrap()
                .await;
        }
        // "kept" still exists; "deleted" was deleted; "again" was deleted and added
        // anew, and has not exited. None of the records reached the disk.
        meta.put_exec("ns", "t", &record("kept")).unwrap();
        meta.put_exec("ns", "t", &record("again")).unwrap();
        events
            .publish(
                "ns",
                "/tasks/exec-added",
                pack(&added("again")).unwrap(),
                None,
            )
            .unwrap()
            .await;
        let done = reconcile_exits(&meta, &events).await.unwrap().0;
        assert_eq!(done.recorded, 1, "{done:?}");
        assert_eq!(
            meta.exit("ns", "t", "kept").unwrap().unwrap().exit_status,
            3
        );
        assert!(meta.exit("ns", "t", "deleted").unwrap().is_none());
        assert!(
            meta.exit("ns", "t", "again").unwrap().is_none(),
            "the new process has not exited"
        );
    }

    #[tokio::test]
    async fn the_log_tells_which_lifecycle_events_of_a_task_are_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        let publish = |topic: &str, any: Any| {
            let events = events.clone();
            let topic = topic.to_string();
            async move { events.publish("ns", &topic, any, None).unwrap().await }
        };
        let create = |id: &str| {
            pack(&ev::TaskCreate {
                container_id: id.into(),
                ..Default::default()
            })
            .unwrap()
        };
        let start = |id: &str| {
            pack(&ev::TaskStart {
                container_id: id.into(),
                ..Default::default()
            })
            .unwrap()
        };
        let delete = |id: &str| {
            pack(&ev::TaskDelete {
                container_id: id.into(),
                ..Default::default()
            })
            .unwrap()
        };
        publish("/tasks/create", create("both")).await;
        publish("/tasks/start", start("both")).await;
        publish("/tasks/create", create("created")).await;
        // "again" ran once, was deleted, and was created anew without a start yet.
        publish("/tasks/create", create("again")).await;
        publish("/tasks/start", start("again")).await;
        publish("/tasks/delete", delete("again")).await;
        publish("/tasks/create", create("again")).await;
        // "gone" was deleted: a task of that id now has neither.
        publish("/tasks/create", create("gone")).await;
        publish("/tasks/delete", delete("gone")).await;

        let logged = reconcile_exits(&meta, &events).await.unwrap().1;
        assert_eq!(logged.retained_since_ns, None, "nothing was dropped");
        assert_eq!(logged.missing("ns", "both", 1), (false, false));
        assert_eq!(logged.missing("ns", "created", 1), (false, true));
        assert_eq!(logged.missing("ns", "again", 1), (false, true));
        assert_eq!(logged.missing("ns", "gone", 1), (true, true));
        assert_eq!(logged.missing("other", "both", 1), (true, true));
    }

    #[tokio::test]
    async fn an_exit_of_an_earlier_incarnation_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        let delete = ev::TaskDelete {
            container_id: "t".into(),
            ..Default::default()
        };
        events
            .publish(
                "ns",
                "/tasks/exit",
                pack(&exit_event(&exit("t", 1))).unwrap(),
                None,
            )
            .unwrap()
            .await;
        events
            .publish("ns", "/tasks/delete", pack(&delete).unwrap(), None)
            .unwrap()
            .await;
        // The same id, created again, still running.
        task(&meta, "t");
        assert_eq!(
            reconcile_exits(&meta, &events).await.unwrap().0,
            Reconciled::default()
        );
        assert!(meta.exit("ns", "t", "").unwrap().is_none());
        // Records from before exits named their events are trusted as they are.
        meta.record_exit("ns", &exit("t", 5)).unwrap();
        assert_eq!(
            reconcile_exits(&meta, &events).await.unwrap().0,
            Reconciled::default()
        );
        assert_eq!(logged_exits(&events, "t").len(), 1);
    }
}

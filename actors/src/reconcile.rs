//! Making records and the events that describe them agree after a crash, before
//! any task is restored: [`reconcile_log`], and the [`LoggedLifecycle`] the same
//! pass over the log yields for the restore.

use keel_protocol::containerd::events::container as cev;
use keel_protocol::containerd::events::task as ev;
use keel_protocol::types::{pack, system_time, timestamp, unpack};
use keel_storage::meta::{nanos, ExitRecord};
use keel_storage::Meta;
use protobuf::MessageField;

use crate::events::EventSink;
use crate::monitor::publish_exit;
use crate::Result;

/// What [`reconcile_log`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Exits whose event was logged but whose record was lost, now recorded.
    pub recorded: usize,
    /// Exits whose record was kept but whose event was lost, now published.
    pub republished: usize,
    /// Deletes (of a task or a container) whose records went but whose event was
    /// lost, now published.
    pub deletes_published: usize,
    /// Deletes whose event was logged but whose records were kept, now finished.
    pub deletes_finished: usize,
    /// `/tasks/create` and `/tasks/start` a crash kept from the log, published
    /// before the task's republished exit.
    pub announced: usize,
}

/// Makes records and the logged events that describe them agree after a crash,
/// before any task is restored. A record and its event reach the disk in separate
/// writes, and a crash between them leaves one without the other:
/// - an exit event nobody recorded (the restored task would publish its exit a
///   second time) gets its record back from the event; an exit record whose event
///   never reached the log (its exit would never be published) gets its event
///   published now;
/// - a task or container whose records are gone while the log still shows it
///   created (its `/tasks/delete` or `/containers/delete` was lost) gets that event
///   published now; one whose delete is logged while its record, older than the
///   delete, was kept (it would come back as a stopped task, announced again) has
///   its records removed.
///
/// Resolves once the events it published are delivered.
/// The same pass over the log also tells which tasks' create and start it holds
/// ([`LoggedLifecycle`]), for the restore that follows.
pub async fn reconcile_log(
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
    // The last lifecycle event logged for each task and each container.
    let mut last_task: HashMap<(String, String), Last> = HashMap::new();
    let mut last_container: HashMap<(String, String), Last> = HashMap::new();
    for env in &retained {
        let payload = env.event.get_or_default();
        let at_ns = env.timestamp.as_ref().map_or(0, |t| nanos(system_time(t)));
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
                    unpack::<ev::TaskCreate>(payload)
                        .map(|e| (e.container_id, Last::Created(e.pid)))
                } else {
                    unpack::<ev::TaskDelete>(payload)
                        .map(|e| (e.container_id, Last::Deleted(at_ns)))
                };
                if let Ok((id, last)) = id {
                    logged.retain(|(ns, cid, _), _| !(ns == &env.namespace && cid == &id));
                    let key = (env.namespace.clone(), id);
                    last_task.insert(key.clone(), last);
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
            "/containers/create" => {
                if let Ok(e) = unpack::<cev::ContainerCreate>(payload) {
                    last_container.insert((env.namespace.clone(), e.id), Last::Created(0));
                }
            }
            "/containers/delete" => {
                if let Ok(e) = unpack::<cev::ContainerDelete>(payload) {
                    last_container.insert((env.namespace.clone(), e.id), Last::Deleted(at_ns));
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
        // The exit's task must show created and started before it exits: a second
        // crash can have kept those from the log too (they are made up at restore,
        // which comes after this). Publish them now, first, and tell the restore.
        if r.exec_id.is_empty() {
            if let Some(t) = meta.task(&ns, &r.container_id)? {
                let (create, start) = lifecycle.missing(&ns, &t.id, t.created_ns);
                let mut missed = Vec::new();
                if create {
                    missed.push((
                        "/tasks/create",
                        pack(&ev::TaskCreate {
                            container_id: t.id.clone(),
                            bundle: t.bundle.clone(),
                            pid: t.pid,
                            ..Default::default()
                        })?,
                    ));
                }
                if start {
                    missed.push((
                        "/tasks/start",
                        pack(&ev::TaskStart {
                            container_id: t.id.clone(),
                            pid: t.pid,
                            ..Default::default()
                        })?,
                    ));
                }
                for (topic, any) in missed {
                    tracing::warn!(namespace = %ns, task_id = %t.id, topic, "publishing, before its exit, an event a crash kept from the log");
                    delivered.push(events.publish(&ns, topic, any, None)?);
                    done.announced += 1;
                }
                lifecycle
                    .tasks
                    .insert((ns.clone(), t.id.clone()), (true, true));
            }
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

    for ((ns, id), last) in &last_task {
        let record = match last {
            Last::Created(_) => meta.has_task(ns, id)?.then_some(None),
            Last::Deleted(_) => meta.task(ns, id)?.map(Some),
        };
        match (last, record) {
            (Last::Created(pid), None) => {
                // The task's last exit in the log, if it ran; as a delete reports it.
                let exit = logged.get(&(ns.clone(), id.clone(), String::new()));
                let event = ev::TaskDelete {
                    container_id: id.clone(),
                    id: id.clone(),
                    pid: exit.map_or(*pid, |(_, e)| e.pid),
                    exit_status: exit.map_or(0, |(_, e)| e.exit_status),
                    exited_at: exit.map_or_else(
                        || MessageField::some(timestamp(std::time::SystemTime::now())),
                        |(_, e)| e.exited_at.clone(),
                    ),
                    ..Default::default()
                };
                tracing::warn!(namespace = %ns, task_id = %id, "publishing a task delete whose event was lost");
                delivered.push(events.publish(ns, "/tasks/delete", pack(&event)?, None)?);
                done.deletes_published += 1;
            }
            (Last::Deleted(at_ns), Some(Some(t))) if t.created_ns < *at_ns => {
                tracing::warn!(namespace = %ns, task_id = %id, "finishing a task delete whose records were kept");
                meta.delete_task(ns, id)?;
                done.deletes_finished += 1;
            }
            _ => {}
        }
    }
    for ((ns, id), last) in &last_container {
        // Only a logged delete needs the record's time; a create, only whether it
        // is there (a container's record, with its spec, is slow to read).
        let record = match last {
            Last::Created(_) => meta.has_container(ns, id)?.then_some(None),
            Last::Deleted(_) => meta.container(ns, id)?.map(Some),
        };
        match (last, record) {
            (Last::Created(_), None) => {
                let event = cev::ContainerDelete {
                    id: id.clone(),
                    ..Default::default()
                };
                tracing::warn!(namespace = %ns, container_id = %id, "publishing a container delete whose event was lost");
                delivered.push(events.publish(ns, "/containers/delete", pack(&event)?, None)?);
                done.deletes_published += 1;
            }
            (Last::Deleted(at_ns), Some(Some(c)))
                if c.created_ns < *at_ns && meta.task(ns, id)?.is_none() =>
            {
                tracing::warn!(namespace = %ns, container_id = %id, "finishing a container delete whose record was kept");
                meta.delete_container(ns, id)?;
                done.deletes_finished += 1;
            }
            _ => {}
        }
    }
    meta.flush()?;
    for d in delivered {
        d.await;
    }
    Ok((done, lifecycle))
}

/// The last lifecycle event the log holds for a task or a container.
#[derive(Debug, Clone, Copy)]
enum Last {
    /// Created (for a task, with its init pid).
    Created(u32),
    /// Deleted, at this time (ns).
    Deleted(u64),
}

/// Which lifecycle events of each task's current incarnation the event log holds,
/// so that a restore can publish those a crash kept from the log. Read by
/// [`reconcile_log`].
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
    /// What the retained log holds of one task's current incarnation (the same
    /// reading [`reconcile_log`] makes of every task), for an actor brought back
    /// after a failure.
    pub fn of_task(events: &EventSink, ns: &str, id: &str) -> Self {
        let (trimmed_upto, retained) = events.retained();
        let mut out = LoggedLifecycle {
            retained_since_ns: (trimmed_upto > 0).then(|| {
                retained
                    .first()
                    .and_then(|e| e.timestamp.as_ref())
                    .map_or(u64::MAX, |t| nanos(system_time(t)))
            }),
            ..LoggedLifecycle::default()
        };
        let key = (ns.to_string(), id.to_string());
        for env in retained.iter().filter(|e| e.namespace == ns) {
            let payload = env.event.get_or_default();
            let named = |field: &str| {
                keel_protocol::types::event_field(payload, field).as_deref() == Some(id)
            };
            match env.topic.as_str() {
                "/tasks/create" if named("container_id") => {
                    out.tasks.entry(key.clone()).or_default().0 = true;
                }
                "/tasks/start" if named("container_id") => {
                    out.tasks.entry(key.clone()).or_default().1 = true;
                }
                "/tasks/delete" if named("container_id") => {
                    out.tasks.remove(&key);
                }
                _ => {}
            }
        }
        out
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventOptions;
    use crate::monitor::{exit_event, MonitorHandle};
    use keel_storage::meta::{ExecRecord, TaskRecord};
    use protobuf::well_known_types::any::Any;

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

    /// Closes and opens the database again, as a restart does.
    fn reopen(dir: &std::path::Path, meta: Meta, events: EventSink) -> (Meta, EventSink) {
        drop(events);
        drop(meta);
        open(dir)
    }

    /// Asserts that records and the log agree: reconciling finds nothing to do.
    async fn assert_settled(meta: &Meta, events: &EventSink) {
        assert_eq!(
            reconcile_log(meta, events).await.unwrap().0,
            Reconciled::default()
        );
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
            created_ns: nanos(std::time::SystemTime::now()),
            started: true,
            runtime: None,
            task_api: 2,
            rootfs: None,
            runtime_options: None,
        };
        meta.put_task("ns", &t).unwrap();
    }

    fn container(meta: &Meta, id: &str) {
        let now = nanos(std::time::SystemTime::now());
        let c = keel_storage::meta::ContainerRecord {
            id: id.into(),
            labels: Default::default(),
            runtime: "io.containerd.runc.v2".into(),
            runtime_options: None,
            spec: Vec::new(),
            rootfs: Vec::new(),
            created_ns: now,
            updated_ns: now,
        };
        meta.create_container("ns", &c).unwrap();
    }

    async fn publish(events: &EventSink, topic: &str, event: &impl protobuf::MessageFull) {
        events
            .publish("ns", topic, pack(event).unwrap(), None)
            .unwrap()
            .await;
    }

    fn logged(events: &EventSink, topic: &str) -> Vec<Any> {
        let retained = events.retained().1;
        retained
            .into_iter()
            .filter(|e| e.topic == topic)
            .map(|e| e.event.get_or_default().clone())
            .collect()
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
        let done = reconcile_log(&meta, &events).await.unwrap().0;
        assert_eq!(
            done,
            Reconciled {
                recorded: 1,
                ..Default::default()
            }
        );
        let r = meta.exit("ns", "t", "").unwrap().unwrap();
        assert_eq!((r.seq, r.exit_status, r.pid), (seq, 7, 2));
        assert_eq!(r.exited_ns, 1_000_000_007);
        assert_settled(&meta, &events).await;
        // The restored task's own report of that exit is now a duplicate.
        let standing = MonitorHandle::start(
            meta.clone(),
            events.clone(),
            tokio::sync::mpsc::unbounded_channel().0,
        )
        .exit("ns", exit("t", 137))
        .await
        .unwrap();
        assert_eq!(standing.exit_status, 7, "the first exit stands");
        assert_eq!(logged_exits(&events, "t").len(), 1);
    }

    /// Logs `/tasks/create` and `/tasks/start` of task `id`.
    async fn announce(events: &EventSink, id: &str) {
        let create = ev::TaskCreate {
            container_id: id.into(),
            pid: 2,
            ..Default::default()
        };
        publish(events, "/tasks/create", &create).await;
        let start = ev::TaskStart {
            container_id: id.into(),
            pid: 2,
            ..Default::default()
        };
        publish(events, "/tasks/start", &start).await;
    }

    /// Records task `id`'s exit under the number its event would have had, and
    /// loses the event (a crash between the record and the log).
    fn record_exit_whose_event_was_lost(meta: &Meta, events: &EventSink, id: &str) -> u64 {
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
                ..exit(id, 3)
            },
        )
        .unwrap();
        lost
    }

    #[tokio::test]
    async fn after_a_double_crash_a_made_up_create_and_start_come_before_the_exit() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        // The task's create and start never reached the log (a first crash), nor
        // did its exit (a second): only the records are there.
        task(&meta, "t");
        record_exit_whose_event_was_lost(&meta, &events, "t");
        meta.flush().unwrap();
        let (meta, events) = reopen(dir.path(), meta, events);
        let (done, lifecycle) = reconcile_log(&meta, &events).await.unwrap();
        assert_eq!((done.announced, done.republished), (2, 1));
        let (_, retained) = events.retained();
        let topics: Vec<&str> = retained
            .iter()
            .filter(|e| e.topic.starts_with("/tasks/"))
            .map(|e| e.topic.as_str())
            .collect();
        assert_eq!(topics, vec!["/tasks/create", "/tasks/start", "/tasks/exit"]);
        let t = meta.task("ns", "t").unwrap().unwrap();
        assert_eq!(
            lifecycle.missing("ns", "t", t.created_ns),
            (false, false),
            "the restore has nothing more to make up"
        );
        assert_settled(&meta, &events).await;
    }

    #[tokio::test]
    async fn a_recorded_exit_whose_event_was_lost_is_published_once() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        task(&meta, "t");
        announce(&events, "t").await;
        // The record names the number its event would have had; the event is lost.
        let lost = record_exit_whose_event_was_lost(&meta, &events, "t");
        meta.flush().unwrap();
        let (meta, events) = reopen(dir.path(), meta, events);
        let done = reconcile_log(&meta, &events).await.unwrap().0;
        assert_eq!(
            done,
            Reconciled {
                republished: 1,
                ..Default::default()
            }
        );
        assert_eq!(logged_exits(&events, "t"), vec![3]);
        let r = meta.exit("ns", "t", "").unwrap().unwrap();
        assert!(r.seq > 0 && r.seq != lost, "the record names the new event");
        assert_settled(&meta, &events).await;
        // Reopened (the republished event and the record's new number are durable).
        let (meta, events) = reopen(dir.path(), meta, events);
        assert_settled(&meta, &events).await;
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
        let done = reconcile_log(&meta, &events).await.unwrap().0;
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
        for id in ["both", "created", "again"] {
            task(&meta, id);
        }
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

        let logged = reconcile_log(&meta, &events).await.unwrap().1;
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
        assert_settled(&meta, &events).await;
        assert!(meta.exit("ns", "t", "").unwrap().is_none());
        // Records from before exits named their events are trusted as they are.
        meta.record_exit("ns", &exit("t", 5)).unwrap();
        assert_settled(&meta, &events).await;
        assert_eq!(logged_exits(&events, "t").len(), 1);
    }

    #[tokio::test]
    async fn a_task_delete_whose_event_was_lost_is_published_once() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        task(&meta, "t");
        let create = ev::TaskCreate {
            container_id: "t".into(),
            pid: 2,
            ..Default::default()
        };
        publish(&events, "/tasks/create", &create).await;
        publish(&events, "/tasks/exit", &exit_event(&exit("t", 7))).await;
        // As if keeld died after the delete removed the records (and sled wrote them
        // out) but before its event reached the log.
        meta.delete_task("ns", "t").unwrap();
        meta.flush().unwrap();
        let (meta, events) = reopen(dir.path(), meta, events);

        let done = reconcile_log(&meta, &events).await.unwrap().0;
        assert_eq!(
            done,
            Reconciled {
                deletes_published: 1,
                ..Default::default()
            }
        );
        let deletes = logged(&events, "/tasks/delete");
        assert_eq!(deletes.len(), 1);
        let d = unpack::<ev::TaskDelete>(&deletes[0]).unwrap();
        assert_eq!((d.container_id.as_str(), d.pid, d.exit_status), ("t", 2, 7));
        assert_eq!(
            d.exited_at.as_ref().map(|t| nanos(system_time(t))),
            Some(1_000_000_007),
            "the delete reports the logged exit"
        );
        // Durable: a second start finds the task's lifecycle closed.
        let (meta, events) = reopen(dir.path(), meta, events);
        assert_settled(&meta, &events).await;
        assert_eq!(logged(&events, "/tasks/delete").len(), 1);
    }

    #[tokio::test]
    async fn a_logged_task_delete_whose_records_were_kept_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        task(&meta, "t");
        task(&meta, "u");
        let ids = |id: &str| ev::TaskCreate {
            container_id: id.into(),
            ..Default::default()
        };
        publish(&events, "/tasks/create", &ids("t")).await;
        publish(&events, "/tasks/create", &ids("u")).await;
        meta.record_exit("ns", &exit("t", 1)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        // t's delete reached the log, its records' removal did not.
        for id in ["t", "u"] {
            let delete = ev::TaskDelete {
                container_id: id.into(),
                ..Default::default()
            };
            publish(&events, "/tasks/delete", &delete).await;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        // u was created again after its delete (its create not logged yet).
        task(&meta, "u");

        let done = reconcile_log(&meta, &events).await.unwrap().0;
        assert_eq!(
            done,
            Reconciled {
                deletes_finished: 1,
                ..Default::default()
            }
        );
        assert!(meta.task("ns", "t").unwrap().is_none());
        assert!(meta.exit("ns", "t", "").unwrap().is_none());
        assert!(
            meta.task("ns", "u").unwrap().is_some(),
            "the newer task stays"
        );
        assert_eq!(
            logged(&events, "/tasks/delete").len(),
            2,
            "nothing published"
        );
    }

    #[tokio::test]
    async fn container_deletes_are_made_up_or_finished() {
        let dir = tempfile::tempdir().unwrap();
        let (meta, events) = open(dir.path());
        let create = |id: &str| cev::ContainerCreate {
            id: id.into(),
            ..Default::default()
        };
        let delete = |id: &str| cev::ContainerDelete {
            id: id.into(),
            ..Default::default()
        };
        // "lost": removed, its delete event lost. "kept": delete logged, record
        // kept. "again": deleted, then created anew. "busy": a live container.
        for id in ["lost", "kept", "again", "busy"] {
            container(&meta, id);
            publish(&events, "/containers/create", &create(id)).await;
        }
        meta.delete_container("ns", "lost").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        publish(&events, "/containers/delete", &delete("kept")).await;
        publish(&events, "/containers/delete", &delete("again")).await;
        meta.delete_container("ns", "again").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        container(&meta, "again");

        let done = reconcile_log(&meta, &events).await.unwrap().0;
        assert_eq!(
            done,
            Reconciled {
                deletes_published: 1,
                deletes_finished: 1,
                ..Default::default()
            }
        );
        let deleted: Vec<String> = logged(&events, "/containers/delete")
            .iter()
            .map(|a| unpack::<cev::ContainerDelete>(a).unwrap().id)
            .collect();
        assert_eq!(deleted, ["kept", "again", "lost"]);
        assert!(meta.container("ns", "kept").unwrap().is_none());
        assert!(meta.container("ns", "again").unwrap().is_some());
        assert!(meta.container("ns", "busy").unwrap().is_some());
        assert_settled(&meta, &events).await;
    }
}

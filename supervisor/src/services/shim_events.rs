//! `containerd.services.events.ttrpc.v1.Events/Forward`, where containerd 1.6 shims
//! send their task events (TTRPC_ADDRESS points at keeld's socket).
//!
//! keel publishes `/tasks/create`, `/tasks/start`, `/tasks/exec-added`,
//! `/tasks/exec-started`, `/tasks/paused`, `/tasks/resumed`, `/tasks/checkpointed`
//! (with the checkpoint's index digest, which the shim cannot know) and
//! `/tasks/delete` itself, when the task actor has done the step, so their order is keel's and each
//! is published once. From the shim it takes what only the shim knows (`/tasks/oom`)
//! into the exchange, and hands `/tasks/exit` (of the init or an exec process) to its
//! task actor, which records and
//! publishes each exit once whichever way it learns of it first.
//!
//! Only a task's own shim may speak for it: an event is accepted only when it names
//! a task (its `container_id`) whose shim keel launched with the caller's pid
//! (SO_PEERCRED), and only the task topics a shim sends; anything else is
//! PermissionDenied. So no client can report an exit or a delete of a live task.

use std::sync::Arc;

use keel_actors::monitor::MonitorHandle;
use keel_actors::task::Tasks;
use keel_protocol::containerd::api::ForwardRequest;
use keel_protocol::containerd::events::task::TaskExit;
use keel_protocol::containerd::shim::events_ttrpc_async::Events;
use keel_protocol::limits::Limits;
use keel_protocol::types::{event_field, system_time, unpack};
use keel_protocol::{identifiers, validate, Error};
use protobuf::well_known_types::empty::Empty;
use ttrpc::asynchronous::TtrpcContext;

use super::{guarded, Rpc};
use crate::server::Auth;

#[derive(Debug)]
pub struct ShimEventsService {
    pub auth: Arc<Auth>,
    pub monitor: MonitorHandle,
    pub tasks: Tasks,
    pub limits: Arc<Limits>,
}

/// What keel does with a task event a shim forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handling {
    /// keel publishes its own, in its own order, when its actor has done the step.
    Drop,
    /// An exit: the task actor records and publishes it once.
    Exit,
    /// Only the shim knows it: published as is.
    Publish,
}

fn handling(topic: &str) -> Option<Handling> {
    match topic {
        "/tasks/create"
        | "/tasks/start"
        | "/tasks/exec-added"
        | "/tasks/exec-started"
        | "/tasks/paused"
        | "/tasks/resumed"
        | "/tasks/checkpointed"
        | "/tasks/delete" => Some(Handling::Drop),
        "/tasks/exit" => Some(Handling::Exit),
        "/tasks/oom" => Some(Handling::Publish),
        t if validate::is_reserved_topic(t) => None,
        _ => Some(Handling::Publish),
    }
}

impl ShimEventsService {
    /// An event about task `task_id`, which is not (or not yet) a task: its own
    /// shim, started by a create still under way, is answered; anyone else is
    /// refused.
    fn while_creating(
        &self,
        namespace: &str,
        task_id: &str,
        handling: Handling,
        caller: i32,
    ) -> ttrpc::Result<Empty> {
        let creating = self.tasks.creating_shim_pid(namespace, task_id);
        if creating.is_none() || creating.map(i64::from) != Some(i64::from(caller)) {
            return Err(Error::PermissionDenied(format!(
                "no task {task_id} in namespace {namespace}: events come only from a task's own shim"
            ))
            .into());
        }
        match handling {
            // keel publishes its own once the step is done.
            Handling::Drop => Ok(Empty::new()),
            // Anything else is sent again by the shim, to the task it will then be.
            Handling::Exit | Handling::Publish => {
                Err(Error::Unavailable(format!("task {task_id} is still being created")).into())
            }
        }
    }
}

#[async_trait::async_trait]
impl Events for ShimEventsService {
    async fn forward(&self, ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        guarded("ShimEvents.Forward", async move {
            let caller = self.auth.request(ctx, "ShimEvents.Forward").rpc()?.peer;
            let env = validate::required("envelope", req.envelope)
                .rpc()?;
            identifiers::validate("envelope.namespace", &env.namespace).rpc()?;
            validate::topic("envelope.topic", &env.topic, &self.limits).rpc()?;
            let event = validate::payload("envelope.event", env.event.as_ref(), &self.limits)
                .rpc()?
                .clone();
            let Some(handling) = handling(&env.topic) else {
                return Err(Error::PermissionDenied(format!(
                    "envelope.topic {:?} is not a topic a shim sends",
                    env.topic
                ))
                .into());
            };
            // Whose event is it? Every containerd task event names its container.
            let task_id = event_field(&event, "container_id").unwrap_or_default();
            identifiers::validate("envelope.event.container_id", &task_id).rpc()?;
            let task = match self.tasks.get(&env.namespace, &task_id) {
                Ok(task) => task,
                // A shim sends `/tasks/create` while keel's create is still under way.
                Err(_) => {
                    return self.while_creating(&env.namespace, &task_id, handling, caller.pid)
                }
            };
            let shim_pid = task.shim_pid();
            if shim_pid == 0 || i64::from(shim_pid) != i64::from(caller.pid) {
                tracing::warn!(
                    pid = caller.pid,
                    uid = caller.uid,
                    namespace = %env.namespace,
                    task_id = %task_id,
                    shim_pid,
                    topic = %env.topic,
                    "refused an event about a task from a process that is not its shim"
                );
                return Err(Error::PermissionDenied(format!(
                    "events about task {task_id} come only from its shim (pid {shim_pid}), not pid {}",
                    caller.pid
                ))
                .into());
            }
            tracing::debug!(namespace = %env.namespace, topic = %env.topic, type_url = %event.type_url, "shim event");
            match handling {
                Handling::Drop => {}
                Handling::Exit => {
                    let exit: TaskExit = unpack(&event).rpc()?;
                    let at = exit
                        .exited_at
                        .as_ref()
                        .map_or_else(std::time::SystemTime::now, system_time);
                    if exit.id == exit.container_id || exit.id.is_empty() {
                        task.notify_exit(exit.exit_status, at);
                    } else {
                        task.notify_exec_exit(&exit.id, exit.exit_status, at);
                    }
                }
                Handling::Publish => {
                    // Answered once the event is delivered: the shim re-sends until then.
                    self.monitor
                        .publish(&env.namespace, &env.topic, event)
                        .await
                        .map_err(keel_protocol::Error::from)
                        .rpc()?;
                }
            }
            Ok(Empty::new())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shims_may_send_task_topics_only() {
        assert_eq!(handling("/tasks/exit"), Some(Handling::Exit));
        assert_eq!(handling("/tasks/oom"), Some(Handling::Publish));
        assert_eq!(handling("/tasks/delete"), Some(Handling::Drop));
        assert_eq!(handling("/containers/delete"), None);
        assert_eq!(handling("/keel/events/gap"), None);
        assert_eq!(handling("/tasks/made-up"), None);
        assert_eq!(handling("/app/custom"), Some(Handling::Publish));
    }
}

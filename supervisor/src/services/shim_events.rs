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

use std::sync::Arc;

use keel_actors::monitor::MonitorHandle;
use keel_actors::task::Tasks;
use keel_protocol::containerd::api::ForwardRequest;
use keel_protocol::containerd::events::task::TaskExit;
use keel_protocol::containerd::shim::events_ttrpc_async::Events;
use keel_protocol::types::{system_time, unpack};
use keel_protocol::Error;
use protobuf::well_known_types::empty::Empty;
use ttrpc::asynchronous::TtrpcContext;

use super::events::validate_envelope;
use super::Rpc;
use crate::server::Auth;

#[derive(Debug)]
pub struct ShimEventsService {
    pub auth: Arc<Auth>,
    pub monitor: MonitorHandle,
    pub tasks: Tasks,
}

#[async_trait::async_trait]
impl Events for ShimEventsService {
    async fn forward(&self, ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        self.auth.request(ctx, "Events.Forward").rpc()?;
        let env = req
            .envelope
            .into_option()
            .ok_or_else(|| Error::InvalidArgument("envelope is required".into()))
            .rpc()?;
        let event = validate_envelope(&env.namespace, &env.topic, env.event.into_option()).rpc()?;
        tracing::debug!(namespace = %env.namespace, topic = %env.topic, type_url = %event.type_url, "shim event");
        match env.topic.as_str() {
            "/tasks/create"
            | "/tasks/start"
            | "/tasks/exec-added"
            | "/tasks/exec-started"
            | "/tasks/paused"
            | "/tasks/resumed"
            | "/tasks/checkpointed"
            | "/tasks/delete" => {}
            "/tasks/exit" => {
                let exit: TaskExit = unpack(&event).rpc()?;
                if let Ok(task) = self.tasks.get(&env.namespace, &exit.container_id) {
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
            }
            _ => {
                // Answered once the event is delivered: the shim re-sends until then.
                self.monitor
                    .publish(&env.namespace, &env.topic, event)
                    .await
                    .map_err(keel_protocol::Error::from)
                    .rpc()?;
            }
        }
        Ok(Empty::new())
    }
}

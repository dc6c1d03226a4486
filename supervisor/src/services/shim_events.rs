//! `containerd.services.events.ttrpc.v1.Events/Forward`, where containerd 1.6 shims
//! send their task events (TTRPC_ADDRESS points at keeld's socket).
//!
//! Envelopes are validated and handed to an in-process sink; the task monitor
//! consumes them.

use std::sync::Arc;

use keel_protocol::containerd::api::ForwardRequest;
use keel_protocol::containerd::shim::events_ttrpc_async::Events;
use keel_protocol::{identifiers, Error};
use protobuf::well_known_types::empty::Empty;
use tokio::sync::broadcast;
use ttrpc::asynchronous::TtrpcContext;

use super::Rpc;
use crate::server::Auth;

/// A validated envelope forwarded by a shim.
#[derive(Debug, Clone)]
pub struct ShimEvent {
    pub namespace: String,
    pub topic: String,
    pub event: protobuf::well_known_types::any::Any,
    pub timestamp: protobuf::well_known_types::timestamp::Timestamp,
}

#[derive(Debug)]
pub struct ShimEventsService {
    pub auth: Arc<Auth>,
    pub sink: broadcast::Sender<ShimEvent>,
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
        identifiers::validate("envelope.namespace", &env.namespace).rpc()?;
        if !env.topic.starts_with('/') {
            return Err(Error::InvalidArgument(format!(
                "envelope.topic {:?} must start with '/'",
                env.topic
            ))
            .into());
        }
        let event = env
            .event
            .into_option()
            .ok_or_else(|| Error::InvalidArgument("envelope.event is required".into()))
            .rpc()?;
        tracing::debug!(namespace = %env.namespace, topic = %env.topic, type_url = %event.type_url, "shim event");
        // No receiver yet is fine: the event is still logged, and shims' events are
        // never the source of truth (keel reconciles with State/Wait).
        let _ = self.sink.send(ShimEvent {
            namespace: env.namespace,
            topic: env.topic,
            event,
            timestamp: env
                .timestamp
                .into_option()
                .unwrap_or_else(keel_protocol::types::now),
        });
        Ok(Empty::new())
    }
}

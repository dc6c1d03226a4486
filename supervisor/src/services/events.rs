//! `keel.services.events.v1.Events`: Publish, Forward and a live Subscribe with
//! containerd's filter language over `topic`, `namespace` and `event.<field>`.
//!
//! Publishers never wait for subscribers: the exchange is a bounded broadcast. A
//! subscriber that falls behind it, or whose client stops reading for longer than
//! [`SEND_STALL`], is ended with Unavailable naming the last sequence number it was
//! sent. Replay (`since`) and durable events are not served yet: Subscribe with
//! `since` is Unimplemented.

use std::sync::Arc;
use std::time::Duration;

use keel_actors::events::EventSink;
use keel_protocol::api::events::*;
use keel_protocol::api::events_ttrpc;
use keel_protocol::filters::{Adaptor, Filter};
use keel_protocol::types::event_field;
use keel_protocol::{identifiers, Error};
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use tokio::sync::broadcast::error::RecvError;
use ttrpc::asynchronous::{ServerStreamSender, TtrpcContext};

use super::Rpc;
use crate::server::{client_gone, Auth};

/// How long one send to a subscriber may block before it counts as stalled.
const SEND_STALL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct EventsService {
    pub auth: Arc<Auth>,
    pub events: EventSink,
}

/// Filter fields of an envelope.
#[derive(Debug)]
pub struct EnvelopeFields<'a>(pub &'a Envelope);

impl Adaptor for EnvelopeFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "topic" => Some(self.0.topic.clone()),
            [f] if f == "namespace" => Some(self.0.namespace.clone()),
            [f, name] if f == "event" => self.0.event.as_ref().and_then(|e| event_field(e, name)),
            _ => None,
        }
    }
}

fn validate_topic(topic: &str) -> Result<(), Error> {
    if !topic.starts_with('/') || topic.len() < 2 || topic.contains(char::is_whitespace) {
        return Err(Error::InvalidArgument(format!(
            "topic {topic:?} must be a path like /tasks/exit"
        )));
    }
    Ok(())
}

/// Checks a forwarded envelope's namespace, topic and payload (keel's own Forward and
/// the shims' share the rules); returns the payload.
pub fn validate_envelope(namespace: &str, topic: &str, event: Option<Any>) -> Result<Any, Error> {
    identifiers::validate("envelope.namespace", namespace)?;
    validate_topic(topic)?;
    event.ok_or_else(|| Error::InvalidArgument("envelope.event is required".into()))
}

#[async_trait::async_trait]
impl events_ttrpc::Events for EventsService {
    async fn publish(&self, ctx: &TtrpcContext, req: PublishRequest) -> ttrpc::Result<Empty> {
        let ns = self.auth.request(ctx, "Events.Publish").rpc()?.namespace;
        validate_topic(&req.topic).rpc()?;
        let event = req
            .event
            .into_option()
            .ok_or_else(|| Error::InvalidArgument("event is required".into()))
            .rpc()?;
        self.events.publish(&ns, &req.topic, event);
        Ok(Empty::new())
    }

    async fn forward(&self, ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        self.auth.request(ctx, "Events.Forward").rpc()?;
        let env = req
            .envelope
            .into_option()
            .ok_or_else(|| Error::InvalidArgument("envelope is required".into()))
            .rpc()?;
        let event = validate_envelope(&env.namespace, &env.topic, env.event.into_option()).rpc()?;
        self.events.publish(&env.namespace, &env.topic, event);
        Ok(Empty::new())
    }

    async fn subscribe(
        &self,
        ctx: &TtrpcContext,
        req: SubscribeRequest,
        tx: ServerStreamSender<Envelope>,
    ) -> ttrpc::Result<()> {
        self.auth.request(ctx, "Events.Subscribe").rpc()?;
        // Parse before anything is sent: a bad filter fails the call itself.
        let filter = Filter::parse_all(&req.filters).rpc()?;
        if req.since.is_some() {
            return Err(
                Error::Unimplemented("replay with since is not supported yet".into()).into(),
            );
        }
        let mut rx = self.events.subscribe();
        let gone = client_gone(ctx);
        tokio::pin!(gone);
        let mut last_sent = 0u64;
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(env) => {
                        if !filter.matches(&EnvelopeFields(&env)) {
                            continue;
                        }
                        match tokio::time::timeout(SEND_STALL, tx.send(&env)).await {
                            Ok(sent) => sent?,
                            Err(_) => {
                                tracing::warn!(last_sent, "subscriber stalled; disconnected");
                                return Err(Error::Unavailable(format!(
                                    "subscriber stalled; resume after sequence {last_sent}"
                                )).into());
                            }
                        }
                        last_sent = env.sequence;
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lagged = n, last_sent, "subscriber fell behind; disconnected");
                        return Err(Error::Unavailable(format!(
                            "subscriber fell {n} events behind; resume after sequence {last_sent}"
                        )).into());
                    }
                    Err(RecvError::Closed) => return Ok(()),
                },
                () = &mut gone => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::containerd::events::task::TaskExit;
    use protobuf::MessageField;

    #[test]
    fn filters_see_topic_namespace_and_payload_fields() {
        let exit = TaskExit {
            container_id: "web".into(),
            exit_status: 137,
            ..Default::default()
        };
        let env = Envelope {
            topic: "/tasks/exit".into(),
            namespace: "bb".into(),
            event: MessageField::some(keel_protocol::types::pack(&exit).unwrap()),
            ..Default::default()
        };
        let cases: &[(&str, bool)] = &[
            ("topic~=/tasks/.+,namespace==bb", true),
            ("topic~=/tasks/.+,namespace==aa", false),
            ("event.container_id==web", true),
            ("event.exit_status==137", true),
            ("event.container_id==db", false),
            ("event.missing", false),
        ];
        for (f, want) in cases {
            assert_eq!(
                Filter::parse(f).unwrap().matches(&EnvelopeFields(&env)),
                *want,
                "{f}"
            );
        }
    }
}

//! `keel.services.events.v1.Events`: Publish, Forward and Subscribe with containerd's
//! filter language over `topic`, `namespace` and `event.<field>`, replay from a
//! sequence number and per-subscriber limits.
//!
//! A subscriber reads the exchange's retained ring by sequence number; publishers
//! never wait for it. It is ended with Unavailable naming the sequence number to
//! resume from when it falls more than `subscriber_buffer` events behind what was
//! published since it subscribed, when retention overtakes it, or when one send to
//! it blocks for longer than [`SEND_STALL`] (its client stopped reading).

use std::sync::Arc;
use std::time::Duration;

use keel_actors::events::{Behind, EventSink, GAP_TOPIC};
use keel_protocol::api::events::*;
use keel_protocol::api::events_ttrpc;
use keel_protocol::filters::{Adaptor, Filter};
use keel_protocol::types::{event_field, pack};
use keel_protocol::{identifiers, Error};
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::asynchronous::{ServerStreamSender, TtrpcContext};

use super::Rpc;
use crate::server::{client_gone, Auth};

/// How long one send to a subscriber may block before it counts as stalled.
const SEND_STALL: Duration = Duration::from_secs(5);
/// Events taken from the ring per read.
const READ_BATCH: usize = 256;

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

impl EventsService {
    /// Ends a subscriber that cannot keep up, naming where to resume.
    fn cut_off(&self, why: &str, cursor: u64, last_sent: u64) -> ttrpc::Error {
        let total = self.events.count_lagged();
        tracing::warn!(
            why,
            resume_since = cursor,
            last_sent,
            disconnected_total = total,
            "subscriber disconnected"
        );
        Error::Unavailable(format!(
            "subscriber {why}; last sequence sent {last_sent}; resume with since={cursor}"
        ))
        .into()
    }
}

/// The notice that starts a replay whose beginning retention has dropped. Its
/// sequence number is the one to resume from, so a client that records the last
/// sequence it saw never asks for the same gap twice.
fn gap_notice(
    namespace: &str,
    requested_since: u64,
    first_retained: u64,
) -> Result<Envelope, Error> {
    let gap = Gap {
        requested_since,
        first_retained,
        ..Default::default()
    };
    Ok(Envelope {
        timestamp: MessageField::some(keel_protocol::types::now()),
        namespace: namespace.to_string(),
        topic: GAP_TOPIC.to_string(),
        event: MessageField::some(pack(&gap)?),
        sequence: first_retained.saturating_sub(1),
        ..Default::default()
    })
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
        let delivered = self
            .events
            .publish(&ns, &req.topic, event, None)
            .map_err(Error::from)
            .rpc()?;
        delivered.await;
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
        let delivered = self
            .events
            .publish(
                &env.namespace,
                &env.topic,
                event,
                env.timestamp.into_option(),
            )
            .map_err(Error::from)
            .rpc()?;
        delivered.await;
        Ok(Empty::new())
    }

    async fn subscribe(
        &self,
        ctx: &TtrpcContext,
        req: SubscribeRequest,
        tx: ServerStreamSender<Envelope>,
    ) -> ttrpc::Result<()> {
        let ns = self.auth.request(ctx, "Events.Subscribe").rpc()?.namespace;
        // Parse before anything is sent: a bad filter fails the call itself.
        let filter = Filter::parse_all(&req.filters).rpc()?;
        let mut watch = self.events.watch();
        let live_from = self.events.head();
        let buffer = self.events.options().subscriber_buffer;
        // Everything after `cursor` is still to be looked at.
        let mut cursor = req.since.unwrap_or(live_from);
        let mut last_sent = 0u64;
        let mut replay_start = req.since.is_some();
        let gone = client_gone(ctx);
        tokio::pin!(gone);
        loop {
            let batch = match self.events.read_after(cursor, READ_BATCH) {
                Ok(b) => b,
                Err(Behind { first_retained }) if replay_start => {
                    tracing::info!(since = cursor, first_retained, "replay starts after a gap");
                    let notice = gap_notice(&ns, cursor, first_retained).rpc()?;
                    tx.send(&notice).await?;
                    cursor = first_retained.saturating_sub(1);
                    replay_start = false;
                    continue;
                }
                Err(Behind { .. }) => {
                    return Err(self.cut_off("was overtaken by retention", cursor, last_sent))
                }
            };
            replay_start = false;
            if batch.is_empty() {
                tokio::select! {
                    changed = watch.changed() => if changed.is_err() { return Ok(()) },
                    () = &mut gone => return Ok(()),
                }
                continue;
            }
            for env in batch {
                if filter.matches(&EnvelopeFields(&env)) {
                    match tokio::time::timeout(SEND_STALL, tx.send(&env)).await {
                        Ok(sent) => sent?,
                        // ttrpc queues the frame before it waits for the socket write,
                        // so the event that timed out still reaches the client when
                        // it reads again: it counts as sent.
                        Err(_) => return Err(self.cut_off("stalled", env.sequence, env.sequence)),
                    }
                    last_sent = env.sequence;
                }
                cursor = env.sequence;
            }
            if self.events.backlog_after(cursor.max(live_from)) > buffer {
                return Err(self.cut_off("fell behind", cursor, last_sent));
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

//! `keel.services.events.v1.Events`: Publish, Forward and Subscribe with containerd's
//! filter language over `topic`, `namespace` and `event.<field>`, replay from a
//! sequence number and per-subscriber limits.
//!
//! Only keel writes keel's history: Publish and Forward refuse the lifecycle topics
//! (`/tasks/*`, `/containers/*`, `/keel/*`) with PermissionDenied, so every such event
//! in the log is one keel published itself, and restore and reconciliation, which
//! act on them, trust nothing a client wrote.
//!
//! Filters are parsed on the blocking pool. Matching a batch of events is done there
//! too when it is heavy (many selectors, payloads to decode), so that no subscriber's
//! filter can hold up the thread that serves every other request.
//!
//! A subscriber reads the exchange's retained ring by sequence number; publishers
//! never wait for it. It is ended with Unavailable naming the sequence number to
//! resume from when it falls more than `subscriber_buffer` events behind what was
//! published since it subscribed (or more than `subscriber_buffer_bytes` of them),
//! when retention overtakes it, or when one send to it blocks for longer than
//! `SEND_STALL` (its client stopped reading).

use std::cell::OnceCell;
use std::sync::Arc;
use std::time::Duration;

use keel_actors::events::{Behind, EventOptions, EventSink, GAP_TOPIC};
use keel_protocol::api::events::*;
use keel_protocol::api::events_ttrpc;
use keel_protocol::filters::{Adaptor, Filter};
use keel_protocol::limits::Limits;
use keel_protocol::types::{pack, DecodedEvent};
use keel_protocol::{identifiers, validate, Error};
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::asynchronous::{ServerStreamSender, TtrpcContext};

use super::{blocking, filters, guarded, Rpc};
use crate::server::{client_gone, Auth};

/// How long one send to a subscriber may block before it counts as stalled.
const SEND_STALL: Duration = Duration::from_secs(5);

/// How often a send that waits on a slow client looks at how far behind it is.
const BEHIND_CHECK: Duration = Duration::from_millis(100);
/// Events taken from the ring per read.
const READ_BATCH: usize = 256;
/// Estimated matching work (bytes scanned) above which a batch is matched on the
/// blocking pool instead of the serving thread.
const INLINE_MATCH_WORK: usize = 256 << 10;

#[derive(Debug)]
pub struct EventsService {
    pub auth: Arc<Auth>,
    pub events: EventSink,
    pub limits: Arc<Limits>,
}

/// Filter fields of an envelope. The payload is decoded the first time a selector
/// reads one of its fields, and only once however many do.
#[derive(Debug)]
pub struct EnvelopeFields<'a> {
    env: &'a Envelope,
    decoded: OnceCell<DecodedEvent>,
}

impl<'a> EnvelopeFields<'a> {
    pub fn new(env: &'a Envelope) -> Self {
        Self {
            env,
            decoded: OnceCell::new(),
        }
    }
}

impl Adaptor for EnvelopeFields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "topic" => Some(self.env.topic.clone()),
            [f] if f == "namespace" => Some(self.env.namespace.clone()),
            [f, name] if f == "event" => {
                let any = self.env.event.as_ref()?;
                self.decoded
                    .get_or_init(|| DecodedEvent::decode(any))
                    .field(name)
            }
            _ => None,
        }
    }
}

/// Which events of `batch` a subscriber is sent: in its scope and matching its
/// filter. A batch whose matching is heavy is matched on the blocking pool.
async fn select(
    filter: &Arc<Filter>,
    scope: Option<Arc<std::collections::HashSet<String>>>,
    batch: Vec<Arc<Envelope>>,
) -> ttrpc::Result<Vec<Arc<Envelope>>> {
    let keep = move |filter: &Filter, batch: Vec<Arc<Envelope>>| {
        batch
            .into_iter()
            // Keel's own notices (no namespace) go to everyone.
            .filter(|e| {
                e.namespace.is_empty() || scope.as_ref().is_none_or(|s| s.contains(&e.namespace))
            })
            .filter(|e| filter.matches(&EnvelopeFields::new(e)))
            .collect::<Vec<_>>()
    };
    if filter.is_always() || match_work(filter, &batch) <= INLINE_MATCH_WORK {
        return Ok(keep(filter, batch));
    }
    let filter = filter.clone();
    blocking(move || Ok::<_, Error>(keep(&filter, batch))).await
}

/// A rough count of the bytes matching `batch` against `filter` scans.
fn match_work(filter: &Filter, batch: &[Arc<Envelope>]) -> usize {
    let payload = filter.reads_payload();
    let per_selector: usize = batch
        .iter()
        .map(|e| {
            e.topic.len()
                + e.namespace.len()
                + if payload {
                    e.event.as_ref().map_or(0, |a| a.value.len())
                } else {
                    0
                }
        })
        .sum();
    per_selector.saturating_mul(filter.selectors())
}

impl EventsService {
    /// Why a subscriber whose next event is after `after` is too far behind
    /// what was published, if it is.
    fn behind(&self, after: u64, opts: &EventOptions) -> Option<String> {
        let (events, bytes) = self.events.backlog_after(after);
        if events > opts.subscriber_buffer {
            return Some(format!(
                "fell more than {} events behind (events.subscriber_buffer)",
                opts.subscriber_buffer
            ));
        }
        (bytes > opts.subscriber_buffer_bytes).then(|| {
            format!(
                "fell more than {} bytes behind (events.subscriber_buffer_bytes)",
                opts.subscriber_buffer_bytes
            )
        })
    }

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
        guarded("Events.Publish", async move {
            let ns = self.auth.request(ctx, "Events.Publish").rpc()?.namespace;
            validate::client_event(
                "topic",
                &req.topic,
                "event",
                req.event.as_ref(),
                &self.limits,
            )
            .rpc()?;
            let event = req.event.into_option().unwrap_or_default();
            let delivered = self
                .events
                .publish(&ns, &req.topic, event, None)
                .map_err(Error::from)
                .rpc()?;
            delivered.await;
            Ok(Empty::new())
        })
        .await
    }

    async fn forward(&self, ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
        guarded("Events.Forward", async move {
            self.auth.request(ctx, "Events.Forward").rpc()?;
            let env = validate::required("envelope", req.envelope).rpc()?;
            identifiers::validate("envelope.namespace", &env.namespace).rpc()?;
            validate::client_event(
                "envelope.topic",
                &env.topic,
                "envelope.event",
                env.event.as_ref(),
                &self.limits,
            )
            .rpc()?;
            let event = env.event.into_option().unwrap_or_default();
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
        })
        .await
    }

    async fn head(&self, ctx: &TtrpcContext, _: Empty) -> ttrpc::Result<HeadResponse> {
        guarded("Events.Head", async move {
            self.auth.request(ctx, "Events.Head").rpc()?;
            Ok(HeadResponse {
                sequence: self.events.head(),
                ..Default::default()
            })
        })
        .await
    }

    async fn subscribe(
        &self,
        ctx: &TtrpcContext,
        req: SubscribeRequest,
        tx: ServerStreamSender<Envelope>,
    ) -> ttrpc::Result<()> {
        guarded("Events.Subscribe", async move {
            let rc = self.auth.request(ctx, "Events.Subscribe").rpc()?;
            let ns = rc.namespace.clone();
            // Parse before anything is sent: a bad filter fails the call itself.
            let filter = Arc::new(filters(req.filters, &self.limits).await?);
            let mut watch = self.events.watch();
            let live_from = self.events.head();
            let opts = self.events.options();
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
                let newest = batch.last().map_or(cursor, |e| e.sequence);
                for env in select(&filter, rc.scope.clone(), batch).await? {
                    // ttrpc queues the frame before it waits for the socket write,
                    // so an event whose send is cut short still reaches the client
                    // when it reads again: it counts as sent.
                    let send = tx.send(&env);
                    tokio::pin!(send);
                    let stalled = tokio::time::sleep(SEND_STALL);
                    tokio::pin!(stalled);
                    loop {
                        tokio::select! {
                            sent = &mut send => {
                                sent?;
                                break;
                            }
                            () = &mut stalled => {
                                return Err(self.cut_off("stalled", env.sequence, env.sequence));
                            }
                            // A client that stopped reading falls behind while its
                            // send waits: checked as it waits, not only after.
                            () = tokio::time::sleep(BEHIND_CHECK) => {
                                if let Some(why) = self.behind(env.sequence.max(live_from), &opts) {
                                    return Err(self.cut_off(&why, env.sequence, env.sequence));
                                }
                            }
                        }
                    }
                    last_sent = env.sequence;
                }
                cursor = newest;
                if let Some(why) = self.behind(cursor.max(live_from), &opts) {
                    return Err(self.cut_off(&why, cursor, last_sent));
                }
            }
        })
        .await
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
            ("topic~=^/tasks/.+,namespace==bb", true),
            ("topic~=^/tasks/.+,namespace==aa", false),
            ("event.container_id==web", true),
            ("event.exit_status==137", true),
            ("event.container_id==db", false),
            ("event.missing", false),
        ];
        for (f, want) in cases {
            assert_eq!(
                Filter::parse(f)
                    .unwrap()
                    .matches(&EnvelopeFields::new(&env)),
                *want,
                "{f}"
            );
        }
    }
}

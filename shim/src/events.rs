//! Events to whoever started the shim: `Forward` calls on
//! `containerd.services.events.ttrpc.v1.Events` at `TTRPC_ADDRESS`.
//!
//! Sent one at a time in the order they happened. The connection is made when
//! the first event goes out and remade after a failure; a failed event is tried
//! again after 1, 2, 4, 8 and 16 s and then dropped, as containerd's shims do (the
//! task's state, `State` and `Wait`, stays the truth: keeld reconciles with it).
//! At most [`QUEUE`] events wait; past that new ones are dropped, logged.

use std::collections::HashMap;
use std::time::Duration;

use containerd_shim_protos::api::ForwardRequest;
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim_async::EventsClient;
use protobuf::{MessageField, MessageFull};
use tokio::sync::mpsc;

use crate::log::log_warn;

/// Events waiting to be sent.
pub const QUEUE: usize = 1024;
const TRIES: u32 = 6;
/// Each Forward call's deadline: 5 s.
const CALL_NANOS: i64 = 5_000_000_000;

/// Where the shim's events go. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Envelope>,
    namespace: String,
}

impl Publisher {
    /// Starts the sender on the current runtime.
    pub fn start(namespace: &str) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
        tokio::spawn(send_all(address, namespace.to_string(), rx));
        Self {
            tx,
            namespace: namespace.to_string(),
        }
    }

    /// The namespace events are sent in (the shim's).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Queues one event.
    pub fn publish<M: MessageFull>(&self, topic: &str, event: &M) {
        let event = match crate::service::pack(event) {
            Ok(any) => any,
            Err(e) => return log_warn!("event {topic}: {e}"),
        };
        let envelope = Envelope {
            timestamp: MessageField::some(std::time::SystemTime::now().into()),
            namespace: self.namespace.clone(),
            topic: topic.to_string(),
            event: MessageField::some(event),
            ..Default::default()
        };
        if self.tx.try_send(envelope).is_err() {
            log_warn!("event {topic} dropped: {QUEUE} events are waiting to be sent");
        }
    }
}

async fn send_all(address: String, namespace: String, mut rx: mpsc::Receiver<Envelope>) {
    let address = if address.is_empty() || address.contains("://") {
        address
    } else {
        format!("unix://{address}")
    };
    let mut client: Option<EventsClient> = None;
    while let Some(envelope) = rx.recv().await {
        if address.is_empty() {
            continue;
        }
        let req = ForwardRequest {
            envelope: MessageField::some(envelope),
            ..Default::default()
        };
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=TRIES {
            if client.is_none() {
                client = ttrpc::asynchronous::Client::connect(&address)
                    .await
                    .ok()
                    .map(EventsClient::new);
            }
            if let Some(c) = &client {
                let mut ctx = ttrpc::context::with_timeout(CALL_NANOS);
                let md: HashMap<String, Vec<String>> = HashMap::from([(
                    "containerd-namespace-ttrpc".to_string(),
                    vec![namespace.clone()],
                )]);
                ctx.metadata = md;
                match c.forward(ctx, &req).await {
                    Ok(_) => break,
                    Err(e) => {
                        client = None;
                        if attempt == TRIES {
                            log_warn!("event {} dropped: {e}", req.envelope.topic);
                        }
                    }
                }
            } else if attempt == TRIES {
                log_warn!(
                    "event {} dropped: cannot connect to {address}",
                    req.envelope.topic
                );
            }
            if attempt < TRIES {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

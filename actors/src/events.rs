//! keel's in-process event exchange: every published event gets a sequence number and
//! goes to a broadcast channel that subscribers (the Events service) read.
//!
//! Publishers never wait: the channel is bounded, and a subscriber that falls behind
//! loses its place and is told so by `broadcast::error::RecvError::Lagged`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keel_protocol::api::events::Envelope;
use protobuf::well_known_types::any::Any;
use protobuf::MessageField;
use tokio::sync::broadcast;

/// Events buffered for subscribers, at most.
const EXCHANGE_CAPACITY: usize = 16_384;

/// Cheap to clone; clones publish into the same exchange.
#[derive(Debug, Clone)]
pub struct EventSink {
    tx: broadcast::Sender<Arc<Envelope>>,
    seq: Arc<AtomicU64>,
}

impl Default for EventSink {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(EXCHANGE_CAPACITY);
        Self {
            tx,
            seq: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Publishes an event now; returns its sequence number.
    pub fn publish(&self, namespace: &str, topic: &str, event: Any) -> u64 {
        let sequence = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let env = Envelope {
            timestamp: MessageField::some(keel_protocol::types::now()),
            namespace: namespace.to_string(),
            topic: topic.to_string(),
            event: MessageField::some(event),
            sequence,
            ..Default::default()
        };
        tracing::debug!(namespace, topic, sequence, "event");
        // No subscriber is not an error.
        let _ = self.tx.send(Arc::new(env));
        sequence
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Envelope>> {
        self.tx.subscribe()
    }
}

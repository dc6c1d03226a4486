//! The baseline of `bench/events.sh`: keel's Events service reduced to what ttrpc
//! streaming itself costs. Publish stamps an envelope and hands it to a tokio
//! broadcast channel; each Subscribe streams what it receives from the channel. No
//! log, no flush, no sequence reservation, no filter, no retention: what is left is
//! ttrpc's framing and socket writes, on one thread as in keeld.
//!
//! usage: raw_events_server SOCKET
//!
//! `events_bench` drives it exactly as it drives keeld (same requests, same
//! payloads), so the two can be compared in one run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keel_protocol::api::events::{Envelope, ForwardRequest, PublishRequest, SubscribeRequest};
use keel_protocol::api::events_ttrpc;
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::asynchronous::{ServerStreamSender, TtrpcContext};

#[derive(Debug)]
struct Raw {
    tx: tokio::sync::broadcast::Sender<Arc<Envelope>>,
    next: AtomicU64,
}

#[async_trait::async_trait]
impl events_ttrpc::Events for Raw {
    async fn publish(&self, _: &TtrpcContext, req: PublishRequest) -> ttrpc::Result<Empty> {
        let env = Envelope {
            timestamp: MessageField::some(keel_protocol::types::now()),
            namespace: "bench".into(),
            topic: req.topic,
            event: req.event,
            sequence: self.next.fetch_add(1, Ordering::Relaxed),
            ..Default::default()
        };
        // No subscriber yet is not an error here.
        let _ = self.tx.send(Arc::new(env));
        Ok(Empty::new())
    }

    async fn forward(&self, _: &TtrpcContext, _: ForwardRequest) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }

    async fn subscribe(
        &self,
        _: &TtrpcContext,
        _: SubscribeRequest,
        tx: ServerStreamSender<Envelope>,
    ) -> ttrpc::Result<()> {
        use tokio::sync::broadcast::error::RecvError;
        let mut rx = self.tx.subscribe();
        loop {
            match rx.recv().await {
                Ok(env) => tx.send(&env).await?,
                Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let socket = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: raw_events_server SOCKET"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let _ = std::fs::remove_file(&socket);
        let (tx, _) = tokio::sync::broadcast::channel(1 << 16);
        let service = Arc::new(Raw {
            tx,
            next: AtomicU64::new(1),
        });
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&format!("unix://{socket}"))?
            .register_service(events_ttrpc::create_events(service));
        server.start().await?;
        std::future::pending::<()>().await;
        Ok(())
    })
}

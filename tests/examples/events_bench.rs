//! Event delivery benchmark against a running keeld (see `bench/events.sh`).
//!
//! usage: events_bench ADDRESS SUBSCRIBERS EVENTS RATE
//!
//! Connects SUBSCRIBERS clients (one connection each) subscribed to the bench topic,
//! then publishes EVENTS events from four publisher connections, either as fast as
//! they go (RATE 0) or paced at RATE events per second in total. Each payload carries
//! its send time; each subscriber measures publish-to-delivery latency. Prints one
//! line of JSON: delivered events per second in total, and latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_protocol::api::events::{PublishRequest, SubscribeRequest};
use keel_protocol::types::{event_from_json, STRUCT_TYPE_URL};
use keel_protocol::Client;
use protobuf::well_known_types::struct_::Struct;
use protobuf::Message;
use protobuf::MessageField;

const TOPIC: &str = "/bench/tick";
const PUBLISHERS: usize = 4;

fn micros_now() -> f64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Microseconds since the epoch fit a double exactly for centuries.
    #[allow(clippy::cast_precision_loss)]
    let us = d.as_micros() as f64;
    us
}

fn request(seq: i64) -> PublishRequest {
    let json = format!("{{\"t\": {}, \"n\": {seq}}}", micros_now());
    PublishRequest {
        topic: TOPIC.into(),
        event: MessageField::some(event_from_json(STRUCT_TYPE_URL, &json).expect("payload")),
        ..Default::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: events_bench ADDRESS SUBSCRIBERS EVENTS RATE"
    );
    let address = &args[1];
    let subscribers: usize = args[2].parse()?;
    let events: usize = args[3].parse()?;
    let rate: u64 = args[4].parse()?;

    // Subscribers: each counts the bench events (n >= 0) and records latencies.
    let ready = Arc::new(tokio::sync::Barrier::new(subscribers + 1));
    let mut handles = Vec::new();
    for _ in 0..subscribers {
        let client = Client::connect(address, Some("bench")).await?;
        let ready = ready.clone();
        handles.push(tokio::spawn(async move {
            let req = SubscribeRequest {
                filters: vec![format!("topic==\"{TOPIC}\"")],
                ..Default::default()
            };
            let mut rx = client.events.subscribe(client.ctx(), &req).await?;
            let mut warm = false;
            let mut lat = Vec::with_capacity(events);
            let mut last = Instant::now();
            while lat.len() < events {
                let Some(env) = rx.recv().await? else {
                    anyhow::bail!("stream ended early");
                };
                let any = env.event.as_ref().expect("payload");
                // Decoded once, directly: the client shares the machine with keeld.
                let fields = Struct::parse_from_bytes(&any.value)?.fields;
                let num = |k: &str| fields.get(k).map_or(-1.0, |v| v.number_value());
                let n = num("n");
                if n < 0.0 {
                    if !warm {
                        warm = true;
                        ready.wait().await;
                    }
                    continue;
                }
                let t = num("t");
                lat.push(micros_now() - t);
                last = Instant::now();
            }
            Ok::<_, anyhow::Error>((lat, last))
        }));
    }
    // Warm-up events until every subscriber has seen one.
    let publisher = Client::connect(address, Some("bench")).await?;
    let warmup = {
        let ready = ready.clone();
        tokio::spawn(async move { ready.wait().await })
    };
    while !warmup.is_finished() {
        publisher
            .events
            .publish(publisher.ctx(), &request(-1))
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let start = Instant::now();
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        let client = Client::connect(address, Some("bench")).await?;
        let share = events / PUBLISHERS + usize::from(p < events % PUBLISHERS);
        // Each publisher paces its own share of the rate.
        let interval = (rate > 0).then(|| Duration::from_secs_f64(PUBLISHERS as f64 / rate as f64));
        pubs.push(tokio::spawn(async move {
            let mut tick = interval.map(tokio::time::interval);
            for i in 0..share {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let n = i64::try_from(i * PUBLISHERS + p).unwrap_or(i64::MAX);
                client.events.publish(client.ctx(), &request(n)).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for p in pubs {
        p.await??;
    }
    let published = start.elapsed();
    let mut all = Vec::with_capacity(events * subscribers);
    let mut end = start;
    for h in handles {
        let (lat, last) = h.await??;
        all.extend(lat);
        end = end.max(last);
    }
    let secs = end.duration_since(start).as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((all.len() as f64 - 1.0) * q).round() as usize;
        all[i] / 1000.0
    };
    #[allow(clippy::cast_precision_loss)]
    let delivered = all.len() as f64;
    #[allow(clippy::cast_precision_loss)]
    let published_per_sec = (events as f64 / published.as_secs_f64()).round();
    println!(
        "{}",
        serde_json::json!({
            "subscribers": subscribers,
            "events": events,
            "rate": rate,
            "publish_secs": published.as_secs_f64(),
            "published_per_sec": published_per_sec,
            "delivered_per_sec": (delivered / secs).round(),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
        })
    );
    Ok(())
}

//! Load for `bench/limits.sh`: large events, and maximal filters against Version.
//!
//! usage:
//!   limits_bench publish ADDRESS COUNT BYTES
//!       publishes COUNT events with a BYTES payload, one after the other
//!   limits_bench version ADDRESS SECONDS FILTER_CLIENTS
//!       times Version every 10 ms for SECONDS from a connection of its own while
//!       FILTER_CLIENTS connections each subscribe, again and again, with the largest
//!       filters the default limits allow (16 filters of up to 1 KiB, heavy `~=`
//!       expressions), the very last selector an invalid expression: keeld
//!       compiles all the others before it finds it, and answers InvalidArgument,
//!       which is when the client sends the next
//!
//! Prints one line of JSON.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_protocol::api::events::{PublishRequest, SubscribeRequest};
use keel_protocol::limits::Limits;
use keel_protocol::types::json_any;
use keel_protocol::Client;
use protobuf::MessageField;

/// The largest filters the default limits allow, each selector a heavy regex.
fn maximal_filters() -> Vec<String> {
    let l = Limits::default();
    (0..l.filters_per_request)
        .map(|f| {
            let mut filter = String::new();
            for i in 0..l.selectors_per_filter {
                let sel = format!("topic~=\"(x{f}_{i}|[a-z]+q|(ab|cd)*e){{1,9}}[^/]{{2,8}}\",");
                if filter.len() + sel.len() + 1 > l.filter_bytes {
                    break;
                }
                filter.push_str(&sel);
            }
            filter.pop();
            filter
        })
        .collect::<Vec<_>>()
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            if i + 1 == l.filters_per_request {
                // Refused only once everything before it is compiled.
                let (head, _) = f.rsplit_once(',').expect("several selectors");
                format!("{head},topic~=(")
            } else {
                f
            }
        })
        .collect()
}

async fn publish(address: &str, count: usize, bytes: usize) -> anyhow::Result<()> {
    let c = Client::connect(address, Some("bench")).await?;
    let start = Instant::now();
    for i in 0..count {
        let req = PublishRequest {
            topic: "/bench/blob".into(),
            event: MessageField::some(json_any(
                "example.Blob",
                vec![u8::try_from(i % 251).unwrap_or(0); bytes],
            )),
            ..Default::default()
        };
        c.events.publish(c.ctx(), &req).await?;
    }
    println!(
        "{}",
        serde_json::json!({ "published": count, "bytes": bytes, "secs": start.elapsed().as_secs_f64() })
    );
    Ok(())
}

async fn version(address: &str, secs: u64, clients: usize) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let compiled = Arc::new(AtomicU64::new(0));
    let filters = maximal_filters();
    let mut load = Vec::new();
    for _ in 0..clients {
        let c = Client::connect(address, Some("bench")).await?;
        let (stop, compiled, filters) = (stop.clone(), compiled.clone(), filters.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = SubscribeRequest {
                    filters: filters.clone(),
                    ..Default::default()
                };
                let mut s = c.events.subscribe(c.ctx(), &req).await?;
                match s.recv().await {
                    Err(ttrpc::Error::RpcStatus(st))
                        if st.code() == ttrpc::Code::INVALID_ARGUMENT => {}
                    other => anyhow::bail!("expected the filters refused, got {other:?}"),
                }
                compiled.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    let c = Client::connect(address, Some("bench")).await?;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut lat = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        c.daemon_version().await?;
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await??;
    }
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((lat.len() as f64 - 1.0) * q).round() as usize;
        lat[i]
    };
    println!(
        "{}",
        serde_json::json!({
            "filter_clients": clients,
            "maximal_subscribes": compiled.load(Ordering::Relaxed),
            "expressions_per_subscribe": filters.iter().map(|f| f.matches("~=").count()).sum::<usize>() - 1,
            "versions": lat.len(),
            "p50_ms": pct(0.5),
            "p99_ms": pct(0.99),
            "max_ms": pct(1.0),
        })
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("publish") if a.len() == 5 => publish(&a[2], a[3].parse()?, a[4].parse()?).await,
        Some("version") if a.len() == 5 => version(&a[2], a[3].parse()?, a[4].parse()?).await,
        _ => anyhow::bail!(
            "usage: limits_bench publish ADDRESS COUNT BYTES | version ADDRESS SECONDS FILTER_CLIENTS"
        ),
    }
}

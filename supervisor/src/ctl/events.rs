//! `keelctl events`: one line per event, like `ctr events`.

use clap::Args;
use keel_protocol::api::events::SubscribeRequest;
use keel_protocol::types::{event_json, system_time};
use keel_protocol::{Client, Error};

use super::output::Format;

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// `table`: `TIMESTAMP NAMESPACE TOPIC PAYLOAD`; `json`: one object per line.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
    /// containerd filters, e.g. `topic~=/tasks/.+,namespace==default` (OR-ed).
    pub filters: Vec<String>,
}

pub async fn run(client: &Client, a: EventsArgs) -> anyhow::Result<i32> {
    let req = SubscribeRequest {
        filters: a.filters,
        ..Default::default()
    };
    let mut rx = client.events.subscribe(client.ctx(), &req).await?;
    while let Some(env) = rx.recv().await.map_err(Error::from)? {
        let ts = env
            .timestamp
            .as_ref()
            .map(|t| rfc3339_nanos(system_time(t)))
            .unwrap_or_default();
        let payload = env
            .event
            .as_ref()
            .map(event_json)
            .unwrap_or_else(|| "{}".into());
        let payload: serde_json::Value =
            serde_json::from_str(&payload).unwrap_or(serde_json::Value::Null);
        match a.format {
            Format::Table => println!("{ts} {} {} {payload}", env.namespace, env.topic),
            Format::Json => println!(
                "{}",
                serde_json::json!({
                    "seq": env.sequence, "timestamp": ts, "namespace": env.namespace,
                    "topic": env.topic, "event": payload,
                })
            ),
        }
    }
    Ok(0)
}

fn rfc3339_nanos(t: std::time::SystemTime) -> String {
    let base = keel_protocol::types::rfc3339(t);
    let nanos = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{}.{nanos:09}Z", base.trim_end_matches('Z'))
}

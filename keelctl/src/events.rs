//! `keelctl events`: one line per event, like `ctr events`, with replay from a
//! sequence number; `keelctl events publish` for scripts and tests.

use std::io::Read;

use clap::{Args, Subcommand};
use keel_client::protocol::api::events::{PublishRequest, SubscribeRequest};
use keel_client::protocol::protobuf::MessageField;
use keel_client::protocol::types::{event_from_json, event_json, system_time, STRUCT_TYPE_URL};
use keel_client::protocol::{Client, Error};

use super::output::Format;

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct EventsArgs {
    #[command(subcommand)]
    pub cmd: Option<EventsCmd>,
    /// Replay retained events after this sequence number, then follow live ones.
    #[arg(long)]
    pub since: Option<u64>,
    /// `table`: `TIMESTAMP NAMESPACE TOPIC PAYLOAD`; `json`: one object per line
    /// with `seq`, `timestamp`, `namespace`, `topic` and `event`.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
    /// containerd filters, e.g. `topic~=^/tasks/,namespace==default` (OR-ed).
    pub filters: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum EventsCmd {
    /// Publish events into --namespace: each JSON value on stdin is one event's
    /// payload, published in order.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Topic, e.g. `/app/deployed`.
    #[arg(long)]
    pub topic: String,
    /// Payload type: `google.protobuf.Struct` (any JSON object) or a containerd
    /// event type such as `containerd.events.TaskExit`.
    #[arg(long = "type", default_value = STRUCT_TYPE_URL)]
    pub type_name: String,
}

pub async fn run(client: &Client, a: EventsArgs) -> anyhow::Result<i32> {
    if let Some(EventsCmd::Publish(p)) = a.cmd {
        return publish(client, p).await;
    }
    let req = SubscribeRequest {
        filters: a.filters,
        since: a.since,
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

async fn publish(client: &Client, p: PublishArgs) -> anyhow::Result<i32> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let mut published = 0usize;
    for value in serde_json::Deserializer::from_str(&input).into_iter::<serde_json::Value>() {
        let value = value.map_err(|e| {
            anyhow::anyhow!(
                "stdin is not a sequence of JSON values (after {published} events): {e}"
            )
        })?;
        let req = PublishRequest {
            topic: p.topic.clone(),
            event: MessageField::some(event_from_json(&p.type_name, &value.to_string())?),
            ..Default::default()
        };
        // One at a time: ttrpc may reorder requests in flight together.
        client.events.publish(client.ctx(), &req).await?;
        published += 1;
    }
    anyhow::ensure!(published > 0, "no event on stdin");
    Ok(0)
}

fn rfc3339_nanos(t: std::time::SystemTime) -> String {
    let base = keel_client::protocol::types::rfc3339(t);
    let nanos = t
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{}.{nanos:09}Z", base.trim_end_matches('Z'))
}

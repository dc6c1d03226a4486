//! `keelctl content …`.

use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Subcommand;
use keel_client::protocol::api::content::*;
use keel_client::protocol::protobuf::well_known_types::field_mask::FieldMask;
use keel_client::protocol::protobuf::MessageField;
use keel_client::protocol::types::system_time;
use keel_client::protocol::{Client, Error};
use tokio::sync::{mpsc, Semaphore};

use super::output::{ago, size, table, Format};

/// Bytes per WRITE message.
const CHUNK: usize = 1 << 20;
/// WRITE messages sent but not yet acknowledged, at most: bounds the memory either
/// side holds for one ingest.
const WINDOW: usize = 8;

#[derive(Debug, Subcommand)]
pub enum ContentCmd {
    /// Ingest stdin under REF and print its digest; re-running resumes a partial ingest.
    Ingest {
        /// Refuse to commit unless the bytes hash to this digest.
        #[arg(long)]
        expected_digest: Option<String>,
        /// Refuse to commit unless exactly this many bytes arrive.
        #[arg(long)]
        expected_size: Option<u64>,
        /// Label to record, key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// List blobs.
    #[command(alias = "list")]
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        /// Filters such as `labels."app"==web` (OR-ed).
        filters: Vec<String>,
    },
    /// Print a blob's metadata as JSON.
    Info { digest: String },
    /// Write a blob's bytes to stdout.
    Get { digest: String },
    /// Delete blobs.
    #[command(alias = "del")]
    Rm {
        #[arg(required = true)]
        digests: Vec<String>,
    },
    /// Set labels (key=value) or remove them (key=).
    Label {
        digest: String,
        #[arg(required = true, value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List ingests in progress.
    Active {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
        filters: Vec<String>,
    },
    /// Remove an ingest in progress.
    Abort {
        #[arg(value_name = "REF")]
        reference: String,
    },
    /// Re-hash every blob and list corrupt ones; exits 1 if any is.
    Fsck,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must be key=value")),
    }
}

fn info_json(i: &Info) -> serde_json::Value {
    serde_json::json!({
        "digest": i.digest,
        "size": i.size,
        "created_at": rfc3339(i.created_at.as_ref()),
        "updated_at": rfc3339(i.updated_at.as_ref()),
        "labels": i.labels,
    })
}

fn rfc3339(
    ts: Option<&keel_client::protocol::protobuf::well_known_types::timestamp::Timestamp>,
) -> String {
    ts.map(|t| keel_client::protocol::types::rfc3339(system_time(t)))
        .unwrap_or_default()
}

pub async fn run(client: &Client, cmd: ContentCmd) -> anyhow::Result<i32> {
    let ctx = || client.ctx();
    match cmd {
        ContentCmd::Ingest {
            expected_digest,
            expected_size,
            labels,
            reference,
        } => {
            let d = ingest(client, &reference, expected_digest, expected_size, labels).await?;
            println!("{d}");
        }
        ContentCmd::Ls { format, filters } => {
            let resp = client
                .content
                .list(
                    ctx(),
                    &ListContentRequest {
                        filters,
                        ..Default::default()
                    },
                )
                .await?;
            match format {
                Format::Json => {
                    for i in &resp.info {
                        println!("{}", info_json(i));
                    }
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = resp
                        .info
                        .iter()
                        .map(|i| {
                            let labels: Vec<String> =
                                i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                            vec![
                                i.digest.clone(),
                                size(u64::try_from(i.size).unwrap_or(0)),
                                i.created_at
                                    .as_ref()
                                    .map(|t| ago(system_time(t)))
                                    .unwrap_or_default(),
                                if labels.is_empty() {
                                    "-".into()
                                } else {
                                    labels.join(",")
                                },
                            ]
                        })
                        .collect();
                    table(&["DIGEST", "SIZE", "AGE", "LABELS"], &rows);
                }
            }
        }
        ContentCmd::Info { digest } => {
            let resp = client
                .content
                .info(
                    ctx(),
                    &InfoRequest {
                        digest,
                        ..Default::default()
                    },
                )
                .await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&info_json(&resp.info)).expect("json")
            );
        }
        ContentCmd::Get { digest } => get(client, digest).await?,
        ContentCmd::Rm { digests } => {
            for digest in digests {
                client
                    .content
                    .delete(
                        ctx(),
                        &DeleteContentRequest {
                            digest: digest.clone(),
                            ..Default::default()
                        },
                    )
                    .await?;
                println!("{digest}");
            }
        }
        ContentCmd::Label { digest, labels } => {
            let mut info = Info {
                digest,
                ..Default::default()
            };
            let mut mask = FieldMask::new();
            for (k, v) in labels {
                mask.paths.push(format!("labels.{k}"));
                if !v.is_empty() {
                    info.labels.insert(k, v);
                }
            }
            let req = UpdateRequest {
                info: MessageField::some(info),
                update_mask: MessageField::some(mask),
                ..Default::default()
            };
            let resp = client.content.update(ctx(), &req).await?;
            let labels: Vec<String> = resp
                .info
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("updated {}: {}", resp.info.digest, labels.join(","));
        }
        ContentCmd::Active { format, filters } => {
            let resp = client
                .content
                .list_statuses(
                    ctx(),
                    &ListStatusesRequest {
                        filters,
                        ..Default::default()
                    },
                )
                .await?;
            match format {
                Format::Json => {
                    for s in &resp.statuses {
                        let j = serde_json::json!({
                            "ref": s.ref_, "offset": s.offset, "total": s.total, "expected": s.expected,
                            "started_at": rfc3339(s.started_at.as_ref()), "updated_at": rfc3339(s.updated_at.as_ref()),
                        });
                        println!("{j}");
                    }
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = resp
                        .statuses
                        .iter()
                        .map(|s| {
                            let total = if s.total > 0 {
                                size(u64::try_from(s.total).unwrap_or(0))
                            } else {
                                "?".into()
                            };
                            vec![
                                s.ref_.clone(),
                                format!("{}/{}", size(u64::try_from(s.offset).unwrap_or(0)), total),
                                s.started_at
                                    .as_ref()
                                    .map(|t| ago(system_time(t)))
                                    .unwrap_or_default(),
                                s.updated_at
                                    .as_ref()
                                    .map(|t| ago(system_time(t)))
                                    .unwrap_or_default(),
                            ]
                        })
                        .collect();
                    table(&["REF", "SIZE", "STARTED", "UPDATED"], &rows);
                }
            }
        }
        ContentCmd::Abort { reference } => {
            client
                .content
                .abort(
                    ctx(),
                    &AbortRequest {
                        ref_: reference,
                        ..Default::default()
                    },
                )
                .await?;
        }
        ContentCmd::Fsck => {
            let r = client.content.fsck(ctx(), &FsckRequest::new()).await?;
            println!("checked {} blobs, {}", r.checked, size(r.bytes));
            for m in &r.mismatches {
                println!("mismatch: {m}");
            }
            for c in &r.corrupt {
                if c.actual.is_empty() {
                    println!("corrupt: {}: {}", c.digest, c.message);
                } else {
                    println!(
                        "corrupt: {}: {} (bytes hash to {})",
                        c.digest, c.message, c.actual
                    );
                }
            }
            if !r.corrupt.is_empty() || !r.mismatches.is_empty() {
                return Ok(1);
            }
            println!("ok");
        }
    }
    Ok(0)
}

async fn get(client: &Client, digest: String) -> anyhow::Result<()> {
    let mut rx = client
        .content
        .read(
            client.ctx(),
            &ReadContentRequest {
                digest,
                ..Default::default()
            },
        )
        .await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(CHUNK, stdout.lock());
    while let Some(resp) = rx.recv().await.map_err(Error::from)? {
        out.write_all(&resp.data).context("write stdout")?;
    }
    out.flush().context("write stdout")?;
    Ok(())
}

/// Reads stdin in chunks on a thread of its own, after skipping `skip` bytes (a seek
/// when stdin is a file). Sends each chunk, then `Ok(None)` at the end.
fn spawn_reader(skip: u64, tx: mpsc::Sender<anyhow::Result<Vec<u8>>>) {
    std::thread::spawn(move || {
        let result = (|| -> anyhow::Result<()> {
            let stdin = std::io::stdin();
            let mut input = stdin.lock();
            let is_file = std::fs::File::from(stdin.as_fd().try_clone_to_owned()?)
                .metadata()?
                .is_file();
            if is_file {
                let mut f = std::fs::File::from(stdin.as_fd().try_clone_to_owned()?);
                let len = f.metadata()?.len();
                if len < skip {
                    bail!("input has {len} bytes but {skip} were already ingested under this ref; abort the ref to start over");
                }
                f.seek(SeekFrom::Current(i64::try_from(skip)?))?;
            } else {
                let copied = std::io::copy(&mut (&mut input).take(skip), &mut std::io::sink())?;
                if copied < skip {
                    bail!("input has {copied} bytes but {skip} were already ingested under this ref; abort the ref to start over");
                }
            }
            loop {
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    let n = input.read(&mut buf[filled..])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    return Ok(());
                }
                buf.truncate(filled);
                if tx.blocking_send(Ok(buf)).is_err() {
                    return Ok(());
                }
            }
        })();
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
}

async fn ingest(
    client: &Client,
    reference: &str,
    expected: Option<String>,
    expected_size: Option<u64>,
    labels: Vec<(String, String)>,
) -> anyhow::Result<String> {
    // Already there? Nothing to send (what containerd's content.WriteBlob does too).
    if let Some(d) = &expected {
        match client
            .content
            .info(
                client.ctx(),
                &InfoRequest {
                    digest: d.clone(),
                    ..Default::default()
                },
            )
            .await
        {
            Ok(_) => return Ok(d.clone()),
            Err(e) => match Error::from(e) {
                Error::NotFound(_) => {}
                other => return Err(other.into()),
            },
        }
    }
    let total = i64::try_from(expected_size.unwrap_or(0))?;
    let expected = expected.unwrap_or_default();
    let stream = client.content.write(client.ctx()).await?;
    let (tx, mut rx) = stream.split();
    tx.send(&WriteContentRequest {
        action: WriteAction::STAT.into(),
        ref_: reference.to_string(),
        total,
        expected: expected.clone(),
        ..Default::default()
    })
    .await?;
    let stat = rx.recv().await.map_err(Error::from)?;
    let resumed = u64::try_from(stat.offset)?;

    let progress = std::io::stderr().is_terminal().then(|| {
        let pb = match expected_size {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {elapsed} {msg}",
            )
            .expect("template"),
        );
        pb.set_position(resumed);
        pb
    });

    // Acknowledgements come back on their own task and open the window again.
    let window = Arc::new(Semaphore::new(WINDOW));
    let acks = {
        let window = window.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let result = async {
                loop {
                    let resp = rx.recv().await.map_err(Error::from)?;
                    match resp.action.enum_value_or_default() {
                        WriteAction::COMMIT => return Ok::<_, Error>(resp.digest),
                        _ => {
                            window.add_permits(1);
                            if let Some(pb) = &progress {
                                pb.set_position(u64::try_from(resp.offset).unwrap_or(0));
                            }
                        }
                    }
                }
            }
            .await;
            // Wake a sender waiting for the window: nothing more will be acknowledged.
            window.close();
            result
        })
    };

    let (chunks_tx, mut chunks) = mpsc::channel(4);
    spawn_reader(resumed, chunks_tx);
    let mut offset = resumed;
    let send_result: anyhow::Result<()> = async {
        while let Some(chunk) = chunks.recv().await {
            let chunk = chunk?;
            window.acquire().await?.forget();
            let len = chunk.len() as u64;
            tx.send(&WriteContentRequest {
                action: WriteAction::WRITE.into(),
                offset: i64::try_from(offset)?,
                data: chunk,
                ..Default::default()
            })
            .await?;
            offset += len;
        }
        // COMMIT names the offset it follows, so the server orders it after the last
        // WRITE. No close_send: the server ends the stream after COMMIT, and a close
        // frame could overtake the COMMIT frame.
        tx.send(&WriteContentRequest {
            action: WriteAction::COMMIT.into(),
            offset: i64::try_from(offset)?,
            total: if total > 0 {
                total
            } else {
                i64::try_from(offset)?
            },
            expected: expected.clone(),
            labels: labels.into_iter().collect(),
            ..Default::default()
        })
        .await?;
        Ok(())
    }
    .await;
    // The server's answer explains a failed send better than the send error does; a
    // local failure (stdin) leaves the server waiting, so do not wait long for it.
    let acked = match &send_result {
        Err(_) => match tokio::time::timeout(std::time::Duration::from_secs(2), acks).await {
            Ok(joined) => joined.context("ingest acknowledgements")?,
            Err(_) => return send_result.map(|()| String::new()),
        },
        Ok(()) => acks.await.context("ingest acknowledgements")?,
    };

    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    match acked {
        Ok(d) => Ok(d),
        Err(Error::AlreadyExists(m)) if !expected.is_empty() => {
            eprintln!("keelctl: {m}");
            Ok(expected)
        }
        Err(e) => match send_result {
            // The stream broke on our side (stdin) and the server only saw it close.
            Err(local) if matches!(e, Error::Transport(_)) => Err(local),
            _ => Err(e.into()),
        },
    }
}

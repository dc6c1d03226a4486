//! `keelctl tasks checkpoint` and the container side of `keelctl run --checkpoint`.

use std::path::PathBuf;

use anyhow::bail;
use keel_client::protocol::api::containers::{container::Runtime, Container};
use keel_client::protocol::api::content::ReadContentRequest;
use keel_client::protocol::api::types::{Descriptor, Mount};
use keel_client::protocol::checkpoint::{spec_from_config, Checkpoint};
use keel_client::protocol::protobuf::well_known_types::any::Any;
use keel_client::protocol::protobuf::{Message, MessageField};
use keel_client::protocol::types::{json_any, SPEC_TYPE_URL};
use keel_client::{CheckpointOptions, Client, Error};

use super::tasks::{kv, rootfs_mount, ContainerArgs};

/// Checkpoints a task; prints the index digest (nothing with `--image-path`).
pub async fn checkpoint(
    client: &Client,
    id: &str,
    exit: bool,
    image_path: Option<PathBuf>,
    criu: &super::options::CheckpointFlags,
) -> anyhow::Result<()> {
    let mut options = CheckpointOptions::new().exit(exit);
    if let Some(p) = image_path {
        options = options.image_path(p);
    }
    let task = client.task(id);
    if let Some(index) = task.checkpoint(&criu.apply(options)).await? {
        println!("{}", index.digest);
    }
    Ok(())
}

/// A whole blob from the content store.
async fn read_blob(client: &Client, digest: &str) -> anyhow::Result<Vec<u8>> {
    let req = ReadContentRequest {
        digest: digest.to_string(),
        ..Default::default()
    };
    let raw = client.raw().await?;
    let mut rx = raw.content.read(raw.ctx(), &req).await?;
    let mut data = Vec::new();
    while let Some(resp) = rx.recv().await.map_err(Error::from)? {
        data.extend_from_slice(&resp.data);
    }
    Ok(data)
}

/// Creates the container a checkpoint was taken of: its spec and runtime from the
/// checkpoint (the runtime unless `--runtime` is given), its rootfs from the checkpoint unless `--rootfs` is given, labels from
/// `--label`. Returns the descriptor to restore the task from.
pub async fn restore_container(
    client: &Client,
    a: &ContainerArgs,
    digest: &str,
) -> anyhow::Result<Descriptor> {
    if !a.command.is_empty() {
        bail!(
            "a task restored from a checkpoint continues its checkpointed process; give no command"
        );
    }
    let index = read_blob(client, digest).await?;
    let checkpoint = Checkpoint::parse(digest, &index)?;
    let spec = spec_from_config(digest, &read_blob(client, &checkpoint.config.digest).await?)?;
    let rootfs = match &a.rootfs {
        Some(dir) => vec![rootfs_mount(dir, &a.fs)?],
        None => checkpoint
            .rootfs
            .iter()
            .map(|m| Mount {
                type_: m.kind.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
                ..Default::default()
            })
            .collect(),
    };
    // `--runtime` restores on another runtime than the one that checkpointed.
    let runtime = if a.runtime.is_empty() {
        checkpoint.runtime.clone()
    } else {
        a.runtime.clone()
    };
    // The options the task was checkpointed with, unless flags give others.
    let options = match (a.runc.options()?, &checkpoint.options) {
        (Some(given), _) => Some(given),
        (None, Some(blob)) => Some(Any::parse_from_bytes(
            &read_blob(client, &blob.digest).await?,
        )?),
        (None, None) => None,
    };
    let c = Container {
        id: a.id.clone(),
        labels: kv(&a.labels, "--label")?.into_iter().collect(),
        runtime: MessageField::some(Runtime {
            name: runtime,
            options: options.into(),
            ..Default::default()
        }),
        spec: MessageField::some(json_any(SPEC_TYPE_URL, spec)),
        rootfs,
        ..Default::default()
    };
    client.containers().create_raw(c).await?;
    Ok(Descriptor {
        media_type: oci_spec::image::MediaType::ImageIndex.to_string(),
        digest: digest.to_string(),
        size: i64::try_from(index.len()).unwrap_or(i64::MAX),
        ..Default::default()
    })
}

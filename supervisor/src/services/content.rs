//! `keel.services.content.v1.Content`: reads go to the store on the blocking pool;
//! every mutation goes through the storage actor.

use std::collections::BTreeMap;
use std::io::SeekFrom;
use std::sync::Arc;

use keel_actors::storage::StorageHandle;
use keel_protocol::api::content::*;
use keel_protocol::api::content_ttrpc;
use keel_protocol::limits::Limits;
use keel_protocol::types::timestamp;
use keel_protocol::{validate, Error};
use keel_storage::digest::validate_ref;
use keel_storage::Digest;
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use ttrpc::asynchronous::{ServerStream, ServerStreamSender, TtrpcContext};

use super::{blocking, filters, guarded, Rpc};
use crate::server::{client_gone, Auth};

/// Bytes per Read response. ttrpc bounds a message at 4 MiB and buffers up to 100
/// messages per connection, so this also bounds what a slow reader can pin.
const READ_CHUNK: usize = 256 << 10;
/// WRITE requests held while an earlier one is still missing, at most.
const MAX_OUT_OF_ORDER: usize = 64;

#[derive(Debug)]
pub struct ContentService {
    pub auth: Arc<Auth>,
    pub storage: StorageHandle,
    pub limits: Arc<Limits>,
    /// One permit per open ingest stream: at most `limits.writers` at once.
    pub writers: Arc<tokio::sync::Semaphore>,
}

impl ContentService {
    pub fn new(auth: Arc<Auth>, storage: StorageHandle, limits: Arc<Limits>) -> Self {
        Self {
            writers: Arc::new(tokio::sync::Semaphore::new(limits.writers)),
            auth,
            storage,
            limits,
        }
    }
}

fn to_info(i: keel_storage::Info) -> Info {
    Info {
        digest: i.digest.to_string(),
        size: i64::try_from(i.size).unwrap_or(i64::MAX),
        created_at: MessageField::some(timestamp(i.created_at)),
        updated_at: MessageField::some(timestamp(i.updated_at)),
        labels: i.labels.into_iter().collect(),
        ..Default::default()
    }
}

fn to_status(s: keel_storage::Status) -> Status {
    Status {
        ref_: s.reference,
        offset: i64::try_from(s.offset).unwrap_or(i64::MAX),
        total: i64::try_from(s.total).unwrap_or(i64::MAX),
        expected: s.expected.map(|d| d.to_string()).unwrap_or_default(),
        started_at: MessageField::some(timestamp(s.started_at)),
        updated_at: MessageField::some(timestamp(s.updated_at)),
        ..Default::default()
    }
}

fn digest(field: &str, s: &str) -> ttrpc::Result<Digest> {
    Digest::parse(field, s).rpc()
}

fn optional_digest(field: &str, s: &str) -> ttrpc::Result<Option<Digest>> {
    if s.is_empty() {
        Ok(None)
    } else {
        digest(field, s).map(Some)
    }
}

fn non_negative(field: &str, v: i64) -> ttrpc::Result<u64> {
    u64::try_from(v).map_err(|_| {
        Error::InvalidArgument(format!("{field} must not be negative, got {v}")).into()
    })
}

fn write_response(action: WriteAction, st: &keel_storage::Status) -> WriteContentResponse {
    WriteContentResponse {
        action: action.into(),
        offset: i64::try_from(st.offset).unwrap_or(i64::MAX),
        total: i64::try_from(st.total).unwrap_or(i64::MAX),
        started_at: MessageField::some(timestamp(st.started_at)),
        updated_at: MessageField::some(timestamp(st.updated_at)),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl content_ttrpc::Content for ContentService {
    async fn info(&self, ctx: &TtrpcContext, req: InfoRequest) -> ttrpc::Result<InfoResponse> {
        guarded("Content.Info", async move {
            let ns = self.auth.request(ctx, "Content.Info").rpc()?.namespace;
            let d = digest("digest", &req.digest)?;
            let store = self.storage.store().clone();
            let info = blocking(move || store.info(&ns, &d)).await?;
            Ok(InfoResponse {
                info: MessageField::some(to_info(info)),
                ..Default::default()
            })
        })
        .await
    }

    async fn update(
        &self,
        ctx: &TtrpcContext,
        req: UpdateRequest,
    ) -> ttrpc::Result<UpdateResponse> {
        guarded("Content.Update", async move {
            let ns = self.auth.request(ctx, "Content.Update").rpc()?.namespace;
            let info = validate::required("info", req.info).rpc()?;
            let d = digest("info.digest", &info.digest)?;
            validate::labels("info.labels", &info.labels, &self.limits).rpc()?;
            let mask = req
                .update_mask
                .into_option()
                .map(|m| m.paths)
                .unwrap_or_default();
            let labels: BTreeMap<_, _> = info.labels.into_iter().collect();
            let updated = self
                .storage
                .update_labels(&ns, d, labels, mask)
                .await
                .rpc()?;
            Ok(UpdateResponse {
                info: MessageField::some(to_info(updated)),
                ..Default::default()
            })
        })
        .await
    }

    async fn list(
        &self,
        ctx: &TtrpcContext,
        req: ListContentRequest,
    ) -> ttrpc::Result<ListContentResponse> {
        guarded("Content.List", async move {
            let ns = self.auth.request(ctx, "Content.List").rpc()?.namespace;
            let filter = filters(req.filters, &self.limits).await?;
            let store = self.storage.store().clone();
            let infos = blocking(move || store.list(&ns, &filter)).await?;
            Ok(ListContentResponse {
                info: infos.into_iter().map(to_info).collect(),
                ..Default::default()
            })
        })
        .await
    }

    async fn delete(&self, ctx: &TtrpcContext, req: DeleteContentRequest) -> ttrpc::Result<Empty> {
        guarded("Content.Delete", async move {
            let ns = self.auth.request(ctx, "Content.Delete").rpc()?.namespace;
            let d = digest("digest", &req.digest)?;
            self.storage.delete(&ns, d).await.rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn read(
        &self,
        ctx: &TtrpcContext,
        req: ReadContentRequest,
        tx: ServerStreamSender<ReadContentResponse>,
    ) -> ttrpc::Result<()> {
        guarded("Content.Read", async move {
            let ns = self.auth.request(ctx, "Content.Read").rpc()?.namespace;
            let d = digest("digest", &req.digest)?;
            let offset = non_negative("offset", req.offset)?;
            let want = non_negative("size", req.size)?;
            let store = self.storage.store().clone();
            let (path, info) = blocking(move || store.reader_path(&ns, &d)).await?;
            if offset > info.size {
                return Err(Error::InvalidArgument(format!(
                    "offset {offset} is past the end of the {} byte blob",
                    info.size
                ))
                .into());
            }
            let end = if want == 0 {
                info.size
            } else {
                (offset + want).min(info.size)
            };
            let io = |e: std::io::Error| {
                ttrpc::Error::from(Error::Internal(format!("read {}: {e}", path.display())))
            };
            let mut f = tokio::fs::File::open(&path).await.map_err(io)?;
            f.seek(SeekFrom::Start(offset)).await.map_err(io)?;
            let mut pos = offset;
            while pos < end {
                let n = usize::try_from(end - pos)
                    .unwrap_or(READ_CHUNK)
                    .min(READ_CHUNK);
                let mut data = vec![0u8; n];
                f.read_exact(&mut data).await.map_err(io)?;
                let resp = ReadContentResponse {
                    offset: i64::try_from(pos).unwrap_or(i64::MAX),
                    data,
                    ..Default::default()
                };
                tx.send(&resp).await?;
                pos += n as u64;
            }
            Ok(())
        })
        .await
    }

    async fn status(
        &self,
        ctx: &TtrpcContext,
        req: StatusRequest,
    ) -> ttrpc::Result<StatusResponse> {
        guarded("Content.Status", async move {
            let ns = self.auth.request(ctx, "Content.Status").rpc()?.namespace;
            let store = self.storage.store().clone();
            let st = blocking(move || store.status(&ns, &req.ref_)).await?;
            Ok(StatusResponse {
                status: MessageField::some(to_status(st)),
                ..Default::default()
            })
        })
        .await
    }

    async fn list_statuses(
        &self,
        ctx: &TtrpcContext,
        req: ListStatusesRequest,
    ) -> ttrpc::Result<ListStatusesResponse> {
        guarded("Content.ListStatuses", async move {
            let ns = self
                .auth
                .request(ctx, "Content.ListStatuses")
                .rpc()?
                .namespace;
            let filter = filters(req.filters, &self.limits).await?;
            let store = self.storage.store().clone();
            let sts = blocking(move || store.list_statuses(&ns, &filter)).await?;
            Ok(ListStatusesResponse {
                statuses: sts.into_iter().map(to_status).collect(),
                ..Default::default()
            })
        })
        .await
    }

    /// The first message names the ref and opens (or resumes) its writer, taking the
    /// ref's lock; STAT, WRITE and COMMIT each get a response. The lock is released
    /// when the stream ends, however it ends (a client that hangs up included);
    /// uncommitted bytes stay for a resume.
    ///
    /// ttrpc 0.10 hands a client stream's frames to the handler from one task per
    /// frame, so two frames sent in order can arrive swapped. WRITE and COMMIT carry
    /// their offset (COMMIT: the total written), and are applied in offset order from a
    /// small bounded buffer (`limits.writer_buffer_bytes`); the client's window keeps
    /// that buffer short. At most `limits.writers` streams are open at once.
    async fn write(
        &self,
        ctx: &TtrpcContext,
        mut stream: ServerStream<WriteContentResponse, WriteContentRequest>,
    ) -> ttrpc::Result<()> {
        guarded("Content.Write", async move {
            let rc = self.auth.request(ctx, "Content.Write").rpc()?;
            let ns = rc.namespace.clone();
            let stream_id = ctx.mh.stream_id;
            // Each message received is handed back to the connection's accounting.
            let consumed = |r: &WriteContentRequest| {
                rc.conn.consumed(
                    stream_id,
                    usize::try_from(protobuf::Message::compute_size(r)).unwrap_or(usize::MAX),
                );
            };
            let gone = client_gone(ctx);
            tokio::pin!(gone);
            let first = tokio::select! {
                r = stream.recv() => r?,
                () = &mut gone => return Err(Error::Cancelled("client hung up".into()).into()),
            };
            let Some(first) = first else {
                return Ok(());
            };
            consumed(&first);
            // Taken once the first message is read, so that a refusal is the stream's
            // only answer.
            let _writer = self.writers.clone().try_acquire_owned().map_err(|_| {
                ttrpc::Error::from(Error::ResourceExhausted(format!(
                    "{} ingests are open, the limit is {} (limits.writers)",
                    self.limits.writers, self.limits.writers
                )))
            })?;
            let reference = first.ref_.clone();
            validate_ref(&reference).rpc()?;
            let total = non_negative("total", first.total)?;
            let expected = optional_digest("expected", &first.expected)?;
            let (lease, mut status) = self
                .storage
                .open_writer(&ns, &reference, total, expected)
                .await
                .rpc()?;
            // Out-of-order WRITE (kind 0) and COMMIT (kind 1) requests, keyed by offset,
            // and the bytes they hold.
            let mut pending: BTreeMap<(u64, u8), WriteContentRequest> = BTreeMap::new();
            let mut pending_bytes = 0usize;
            let mut next = Some(first);
            loop {
                let req = match next.take() {
                    Some(r) => r,
                    None => tokio::select! {
                        r = stream.recv() => match r {
                            Ok(Some(r)) => {
                                consumed(&r);
                                r
                            }
                            Ok(None) => {
                                tracing::info!(namespace = %ns, reference = %reference, "content writer's client closed its stream");
                                return Ok(());
                            }
                            Err(e) => {
                                tracing::info!(namespace = %ns, reference = %reference, error = %e, "content writer's stream broke");
                                return Err(e);
                            }
                        },
                        () = &mut gone => {
                            tracing::info!(namespace = %ns, reference = %reference, "content writer's client hung up");
                            return Err(Error::Cancelled("client hung up".into()).into());
                        }
                    },
                };
                if !req.ref_.is_empty() && req.ref_ != reference {
                    return Err(Error::InvalidArgument(format!(
                        "ref {:?} differs from the stream's ref {reference:?}",
                        req.ref_
                    ))
                    .into());
                }
                let action = req.action.enum_value().map_err(|v| {
                    ttrpc::Error::from(Error::InvalidArgument(format!("unknown write action {v}")))
                })?;
                let offset = non_negative("offset", req.offset)?;
                match action {
                    WriteAction::STAT => {
                        if !req.data.is_empty() {
                            return Err(Error::InvalidArgument(
                                "a STAT request carries no data".into(),
                            )
                            .into());
                        }
                        stream.send(&write_response(action, &status)).await?;
                        continue;
                    }
                    WriteAction::WRITE if req.data.is_empty() => {
                        return Err(Error::InvalidArgument("a WRITE request needs data".into()).into());
                    }
                    _ => {}
                }
                if offset < status.offset {
                    return Err(Error::FailedPrecondition(format!(
                        "write at offset {offset}, but ref {reference:?} has {} bytes; resume from {}",
                        status.offset, status.offset
                    ))
                    .into());
                }
                let kind = u8::from(action == WriteAction::COMMIT);
                if let Err(e) = validate::labels("labels", &req.labels, &self.limits) {
                    return Err(e.into());
                }
                pending_bytes += req.data.len();
                if pending_bytes > self.limits.writer_buffer_bytes {
                    return Err(Error::ResourceExhausted(format!(
                        "{pending_bytes} bytes of writes wait ahead of offset {}, the limit is {} (limits.writer_buffer_bytes); a request is missing",
                        status.offset, self.limits.writer_buffer_bytes
                    ))
                    .into());
                }
                if pending.insert((offset, kind), req).is_some() {
                    return Err(Error::InvalidArgument(format!(
                        "two {action:?} requests at offset {offset}"
                    ))
                    .into());
                }
                if pending.len() > MAX_OUT_OF_ORDER {
                    return Err(Error::FailedPrecondition(format!(
                        "more than {MAX_OUT_OF_ORDER} writes ahead of offset {}; a request is missing",
                        status.offset
                    ))
                    .into());
                }
                // Apply everything that now lines up.
                while let Some(entry) = pending.first_entry() {
                    if entry.key().0 != status.offset {
                        break;
                    }
                    let (_, mut req) = entry.remove_entry();
                    pending_bytes -= req.data.len();
                    if !req.data.is_empty() {
                        status = lease
                            .write(status.offset, std::mem::take(&mut req.data))
                            .await
                            .rpc()?;
                    }
                    if req.action.enum_value_or_default() == WriteAction::COMMIT {
                        let size = non_negative("total", req.total)?;
                        let expected = optional_digest("expected", &req.expected)?;
                        let labels = std::mem::take(&mut req.labels).into_iter().collect();
                        let (d, size) = lease.commit(size, expected, labels).await.rpc()?;
                        let mut resp = write_response(WriteAction::COMMIT, &status);
                        resp.offset = i64::try_from(size).unwrap_or(i64::MAX);
                        resp.digest = d.to_string();
                        stream.send(&resp).await?;
                        return Ok(());
                    }
                    stream
                        .send(&write_response(WriteAction::WRITE, &status))
                        .await?;
                }
            }
        })
        .await
    }

    async fn abort(&self, ctx: &TtrpcContext, req: AbortRequest) -> ttrpc::Result<Empty> {
        guarded("Content.Abort", async move {
            let ns = self.auth.request(ctx, "Content.Abort").rpc()?.namespace;
            validate_ref(&req.ref_).rpc()?;
            self.storage.abort(&ns, &req.ref_).await.rpc()?;
            Ok(Empty::new())
        })
        .await
    }

    async fn fsck(&self, ctx: &TtrpcContext, _: FsckRequest) -> ttrpc::Result<FsckResponse> {
        guarded("Content.Fsck", async move {
            self.auth.request(ctx, "Content.Fsck").rpc()?;
            let r = self.storage.fsck().await.rpc()?;
            Ok(FsckResponse {
                checked: r.checked,
                bytes: r.bytes,
                corrupt: r
                    .corrupt
                    .into_iter()
                    .map(|(digest, actual, message)| CorruptBlob {
                        digest,
                        actual,
                        message,
                        ..Default::default()
                    })
                    .collect(),
                mismatches: r.mismatches,
                ..Default::default()
            })
        })
        .await
    }
}

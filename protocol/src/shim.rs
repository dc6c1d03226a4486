//! Client of a shim's task service, `containerd.task.v2.Task` or `containerd.task.v3.Task`.
//!
//! containerd-shim-protos 0.12 generates its client for `containerd.task.v3.Task`, which a
//! containerd 1.6 shim answers with UNIMPLEMENTED. The v2 and v3 messages are
//! wire-identical, so this client reuses the crate's message types and sends each call
//! under the service name of the task API the shim serves: v2 unless its `start`
//! announced version 3 in bootstrap JSON (see [`ShimClient::task_api`]).

use std::collections::HashMap;

use containerd_shim_protos::api;
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageFull;
use ttrpc::asynchronous::Client as TtrpcClient;

use crate::{Error, Result, NAMESPACE_KEY};

/// The service name a containerd 1.6 shim serves.
pub const TASK_SERVICE_V2: &str = "containerd.task.v2.Task";

/// The service name of task API version 3 (containerd 2.0's shims).
pub const TASK_SERVICE_V3: &str = "containerd.task.v3.Task";

/// The task API versions this client speaks.
pub const TASK_APIS: [u32; 2] = [2, 3];

/// The service name of task API `version` (2 or 3).
pub fn task_service(version: u32) -> Result<&'static str> {
    match version {
        2 => Ok(TASK_SERVICE_V2),
        3 => Ok(TASK_SERVICE_V3),
        v => Err(Error::InvalidArgument(format!(
            "task API version {v}: keel speaks versions 2 and 3"
        ))),
    }
}

/// A connection to one shim. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct ShimClient {
    inner: TtrpcClient,
    namespace: String,
    service: &'static str,
}

impl std::fmt::Debug for ShimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShimClient")
            .field("namespace", &self.namespace)
            .field("service", &self.service)
            .finish()
    }
}

macro_rules! shim_calls {
    ($($(#[$doc:meta])* $fn:ident => $method:literal ($req:ty) -> $resp:ty;)*) => {
        $(
            $(#[$doc])*
            pub async fn $fn(&self, req: &$req, timeout: Option<std::time::Duration>) -> Result<$resp> {
                self.call($method, req, timeout).await
            }
        )*
    };
}

impl ShimClient {
    /// Connects to a shim at the address its `start` printed (`unix:///run/containerd/s/…`).
    pub async fn connect(address: &str, namespace: &str) -> Result<Self> {
        let inner = TtrpcClient::connect(address)
            .await
            .map_err(|e| Error::Unavailable(format!("connect to shim at {address}: {e}")))?;
        Ok(Self::new(inner, namespace))
    }

    /// Wraps a connected unix socket (which must be in non-blocking mode).
    pub fn from_stream(stream: std::os::unix::net::UnixStream, namespace: &str) -> Result<Self> {
        let stream = tokio::net::UnixStream::from_std(stream)
            .map_err(|e| Error::Unavailable(format!("shim connection: {e}")))?;
        let socket = ttrpc::asynchronous::transport::Socket::from(stream);
        Ok(Self::new(TtrpcClient::new(socket), namespace))
    }

    /// Wraps an existing ttrpc connection; calls go to the v2 task service.
    pub fn new(inner: TtrpcClient, namespace: &str) -> Self {
        Self {
            inner,
            namespace: namespace.to_string(),
            service: TASK_SERVICE_V2,
        }
    }

    /// The same connection, its calls sent to task API `version` (2 or 3).
    pub fn task_api(self, version: u32) -> Result<Self> {
        Ok(Self {
            service: task_service(version)?,
            ..self
        })
    }

    /// Sends one unary call under the shim's service name. A zero timeout means none: the
    /// Go shim turns any non-zero timeout into a context deadline, so Wait must use zero.
    async fn call<Req: MessageFull, Resp: MessageFull>(
        &self,
        method: &str,
        req: &Req,
        timeout: Option<std::time::Duration>,
    ) -> Result<Resp> {
        let mut metadata = HashMap::new();
        metadata.insert(NAMESPACE_KEY.to_string(), vec![self.namespace.clone()]);
        let mut request = ttrpc::Request::new();
        request.service = self.service.to_string();
        request.method = method.to_string();
        request.timeout_nano =
            timeout.map_or(0, |t| i64::try_from(t.as_nanos()).unwrap_or(i64::MAX));
        request.metadata = ttrpc::context::to_pb(metadata);
        request.payload = req.write_to_bytes()?;
        let resp = self.inner.request(request).await?;
        Ok(Resp::parse_from_bytes(&resp.payload)?)
    }

    shim_calls! {
        state => "State" (api::StateRequest) -> api::StateResponse;
        create => "Create" (api::CreateTaskRequest) -> api::CreateTaskResponse;
        start => "Start" (api::StartRequest) -> api::StartResponse;
        delete => "Delete" (api::DeleteRequest) -> api::DeleteResponse;
        pids => "Pids" (api::PidsRequest) -> api::PidsResponse;
        pause => "Pause" (api::PauseRequest) -> Empty;
        resume => "Resume" (api::ResumeRequest) -> Empty;
        checkpoint => "Checkpoint" (api::CheckpointTaskRequest) -> Empty;
        kill => "Kill" (api::KillRequest) -> Empty;
        exec => "Exec" (api::ExecProcessRequest) -> Empty;
        resize_pty => "ResizePty" (api::ResizePtyRequest) -> Empty;
        close_io => "CloseIO" (api::CloseIORequest) -> Empty;
        update => "Update" (api::UpdateTaskRequest) -> Empty;
        /// Blocks until the process exits; pass `None` as the timeout.
        wait => "Wait" (api::WaitRequest) -> api::WaitResponse;
        stats => "Stats" (api::StatsRequest) -> api::StatsResponse;
        connect_shim => "Connect" (api::ConnectRequest) -> api::ConnectResponse;
        /// The shim may exit before it replies; callers treat `early eof` as success.
        shutdown => "Shutdown" (api::ShutdownRequest) -> Empty;
    }
}

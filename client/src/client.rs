//! The connection to keeld, and how calls survive keeld restarting.
//!
//! A [`Client`] holds at most one ttrpc connection. A call that finds none
//! connects first, retrying for up to the reconnect timeout while keeld is down.
//! When a call fails without a status (the connection broke), the connection is
//! dropped and what happens next depends on the call:
//!
//! - calls that change nothing, and `Wait`, are sent again on a new connection, so
//!   a reader or a waiter rides through a keeld restart;
//! - calls that change something are never sent twice: one that was in flight when
//!   the connection broke fails with [`Error::Unavailable`] saying its outcome is
//!   unknown. So that this happens only when keeld really died during the call, a
//!   connection that has been idle is checked (a `Version` call) before such a call
//!   is sent on it; if the check fails, the call waits for keeld to come back and
//!   is sent on the new connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_protocol::api::events::HeadResponse;
use keel_protocol::{Error, Result, NAMESPACE_KEY};
use tokio::sync::Mutex;
use ttrpc::context::Context;

use crate::containers::Containers;
use crate::task::Task;

/// The raw ttrpc stubs of one connection.
pub(crate) type Raw = keel_protocol::Client;

/// How a call may be repeated after its connection broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// It changes nothing (or waits): sent again on a new connection.
    Always,
    /// It changes something: sent at most once.
    Once,
}

/// Builds a [`Client`] with options other than the defaults.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    address: String,
    namespace: String,
    request_timeout: Option<Duration>,
    reconnect_timeout: Duration,
}

impl ClientBuilder {
    /// A builder for keeld at `address` (a socket path or `unix://` address).
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            namespace: crate::DEFAULT_NAMESPACE.to_string(),
            request_timeout: None,
            reconnect_timeout: Duration::from_secs(30),
        }
    }

    /// The namespace every call is made in (default `default`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// A deadline for each unary call, sent to keeld with it (default: none).
    /// `wait` and event streams are not bounded by it.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// How long a call waits for keeld while it cannot be reached, before failing
    /// with [`Error::Unavailable`] (default 30 s).
    pub fn reconnect_timeout(mut self, timeout: Duration) -> Self {
        self.reconnect_timeout = timeout;
        self
    }

    /// Connects now: an error if keeld cannot be reached within the reconnect
    /// timeout.
    pub async fn connect(self) -> Result<Client> {
        keel_protocol::identifiers::validate("namespace", &self.namespace)?;
        let client = Client {
            inner: Arc::new(Inner {
                address: self.address,
                request_timeout: self.request_timeout,
                reconnect_timeout: self.reconnect_timeout,
                conn: Mutex::new(Conn::default()),
            }),
            namespace: self.namespace,
        };
        client.connection(&mut None).await?;
        Ok(client)
    }
}

/// A client of keeld in one namespace. Cheap to clone: clones share the
/// connection.
///
/// ```no_run
/// # async fn f() -> keel_client::Result<()> {
/// let client = keel_client::ClientBuilder::new("/run/keel/keel.sock")
///     .namespace("prod")
///     .reconnect_timeout(std::time::Duration::from_secs(60))
///     .connect()
///     .await?;
/// let (version, revision) = client.version().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    namespace: String,
}

struct Inner {
    address: String,
    request_timeout: Option<Duration>,
    reconnect_timeout: Duration,
    conn: Mutex<Conn>,
}

/// The current connection, if any, numbered so that a failure seen on an old one
/// never drops its successor.
#[derive(Default)]
struct Conn {
    generation: u64,
    raw: Option<Raw>,
    last_ok: Option<Instant>,
}

/// A connection handed to one call.
pub(crate) struct Lease {
    generation: u64,
    pub(crate) raw: Raw,
    /// Made for this call, or used successfully a moment ago: known to be alive.
    fresh: bool,
}

/// A connection used successfully this recently is not checked before a call
/// that may not be repeated.
const KNOWN_ALIVE: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.inner.address)
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl Client {
    /// Connects to keeld at `address` in the default namespace with default
    /// timeouts; see [`ClientBuilder`] for others.
    pub async fn connect(address: &str) -> Result<Self> {
        ClientBuilder::new(address).connect().await
    }

    /// The same connection, making its calls in `namespace`.
    pub fn with_namespace(&self, namespace: &str) -> Result<Self> {
        keel_protocol::identifiers::validate("namespace", namespace)?;
        Ok(Self {
            inner: self.inner.clone(),
            namespace: namespace.to_string(),
        })
    }

    /// The namespace this client's calls are made in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// keeld's version and git revision.
    pub async fn version(&self) -> Result<(String, String)> {
        let r = self
            .call("Version", Retry::Always, |raw, ctx| async move {
                raw.version.version(ctx, &Default::default()).await
            })
            .await?;
        Ok((r.version, r.revision))
    }

    /// The containers of this namespace.
    pub fn containers(&self) -> Containers {
        Containers::new(self.clone())
    }

    /// The task of container `id`, if it has one (NotFound otherwise): for a task
    /// another client (or an earlier run of this program) created.
    pub async fn load_task(&self, id: &str) -> Result<Task> {
        Task::load(self.clone(), id).await
    }

    /// A handle to container `id`'s task without a call to keeld: for one call on
    /// a task known to exist (a missing one answers that call with NotFound).
    pub fn task(&self, id: &str) -> Task {
        Task::handle(self.clone(), id)
    }

    /// The tasks of this namespace matching `filter` (containerd's filter language
    /// over `id`, `namespace`, `pid` and `status`, e.g. `status==running`; empty
    /// for all).
    pub async fn tasks(&self, filter: &str) -> Result<Vec<crate::TaskState>> {
        crate::task::list(self, filter).await
    }

    /// The sequence number of the newest event keeld has delivered.
    pub async fn events_head(&self) -> Result<u64> {
        let r: HeadResponse = self
            .call("Events.Head", Retry::Always, |raw, ctx| async move {
                raw.events.head(ctx, &Default::default()).await
            })
            .await?;
        Ok(r.sequence)
    }

    /// The raw ttrpc stubs of the current connection (connecting if there is
    /// none), for calls this library does not wrap; their `ctx()` carries this
    /// client's namespace. They do not reconnect.
    pub async fn raw(&self) -> Result<keel_protocol::Client> {
        Ok(self
            .connection(&mut None)
            .await?
            .raw
            .with_namespace(&self.namespace))
    }

    /// How long a call waits for keeld while it cannot be reached.
    pub fn reconnect_timeout(&self) -> Duration {
        self.inner.reconnect_timeout
    }

    /// A call context with this client's namespace and request timeout.
    pub fn context(&self) -> Context {
        self.context_with(self.inner.request_timeout)
    }

    /// A call context with this client's namespace and no timeout (for `Wait` and
    /// streams).
    pub(crate) fn context_with(&self, timeout: Option<Duration>) -> Context {
        let mut ctx = ttrpc::context::with_timeout(
            timeout.map_or(0, |t| i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)),
        );
        ctx.metadata
            .insert(NAMESPACE_KEY.to_string(), vec![self.namespace.clone()]);
        ctx
    }

    /// Makes one call, as the module documentation describes.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, retry: Retry, f: F) -> Result<T>
    where
        F: Fn(Raw, Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        self.call_in(what, retry, self.context(), f).await
    }

    /// [`Client::call`] with a context of the caller's.
    pub(crate) async fn call_in<T, F, Fut>(
        &self,
        what: &str,
        retry: Retry,
        ctx: Context,
        f: F,
    ) -> Result<T>
    where
        F: Fn(Raw, Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        // When keeld was first found unreachable during this call.
        let mut outage = None;
        let mut pause = Backoff::new();
        loop {
            let lease = self.connection(&mut outage).await?;
            if retry == Retry::Once && !lease.fresh && !self.alive(&lease).await {
                continue;
            }
            let sent = Instant::now();
            let result = f(lease.raw.clone(), ctx.clone()).await;
            if let Err(e) = &result {
                // The connection was gone before the request left: whatever the
                // call, it goes out again on a new one.
                if never_sent(e) {
                    self.broken(lease.generation).await;
                    let since = *outage.get_or_insert_with(Instant::now);
                    self.give_up_after(since, what, &e.to_string())?;
                    continue;
                }
            }
            match result.map_err(classify) {
                Ok(v) => {
                    self.used(lease.generation).await;
                    return Ok(v);
                }
                Err(Error::Transport(e)) => {
                    self.broken(lease.generation).await;
                    if retry == Retry::Once {
                        return Err(Error::Unavailable(format!(
                            "the connection to keeld broke during {what} ({e}); whether it took effect is unknown"
                        )));
                    }
                    // The outage starts now, unless this is one going on (a new
                    // connection dropped at once). A call that ran longer than
                    // the deadline (a wait) starts a new one: each keeld restart
                    // gets the whole deadline.
                    if outage.is_none() || sent.elapsed() >= self.inner.reconnect_timeout {
                        outage = Some(Instant::now());
                    }
                    let since = outage.unwrap_or(sent);
                    self.give_up_after(since, what, &e)?;
                    pause.sleep().await;
                }
                // keeld is starting or stopping (or an actor is restarting): a
                // call that changes nothing tries again, within the same deadline.
                Err(Error::Unavailable(m)) if retry == Retry::Always => {
                    let since = *outage.get_or_insert_with(Instant::now);
                    self.give_up_after(since, what, &m)?;
                    pause.sleep().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Unavailable once keeld has been unreachable since `since` for longer than
    /// the reconnect timeout.
    fn give_up_after(&self, since: Instant, what: &str, why: &str) -> Result<()> {
        if since.elapsed() >= self.inner.reconnect_timeout {
            return Err(Error::Unavailable(format!(
                "{what}: keeld at {} unavailable for {:?}: {why}",
                self.inner.address, self.inner.reconnect_timeout
            )));
        }
        Ok(())
    }

    /// Whether an idle connection still answers; drops it if not.
    async fn alive(&self, lease: &Lease) -> bool {
        let ctx = self.context_with(Some(Duration::from_secs(5)));
        match lease.raw.version.version(ctx, &Default::default()).await {
            Ok(_) => true,
            Err(ttrpc::Error::RpcStatus(_)) => true,
            Err(_) => {
                self.broken(lease.generation).await;
                false
            }
        }
    }

    /// The current connection, or a new one: retried every so often while keeld
    /// cannot be reached, until the reconnect timeout has passed since `outage`
    /// (set to now if unset).
    pub(crate) async fn connection(&self, outage: &mut Option<Instant>) -> Result<Lease> {
        // Taken before the lock: a caller queued behind a reconnect waits for the
        // same deadline as the one making it, not a deadline of its own after it.
        let since = outage.unwrap_or_else(Instant::now);
        let mut conn = self.inner.conn.lock().await;
        if let Some(raw) = &conn.raw {
            return Ok(Lease {
                generation: conn.generation,
                raw: raw.clone(),
                fresh: conn.last_ok.is_some_and(|t| t.elapsed() < KNOWN_ALIVE),
            });
        }
        *outage = Some(since);
        let mut pause = Backoff::new();
        loop {
            match Raw::connect(&self.inner.address, None).await {
                Ok(raw) => {
                    conn.generation += 1;
                    conn.raw = Some(raw.clone());
                    conn.last_ok = Some(Instant::now());
                    return Ok(Lease {
                        generation: conn.generation,
                        raw,
                        fresh: true,
                    });
                }
                Err(e) if since.elapsed() >= self.inner.reconnect_timeout => {
                    return Err(if self.inner.reconnect_timeout.is_zero() {
                        e
                    } else {
                        Error::Unavailable(format!(
                            "keeld at {} could not be reached for {:?}: {}",
                            self.inner.address,
                            self.inner.reconnect_timeout,
                            e.message()
                        ))
                    });
                }
                Err(_) => pause.sleep().await,
            }
        }
    }

    /// Notes that connection `generation` answered.
    async fn used(&self, generation: u64) {
        let mut conn = self.inner.conn.lock().await;
        if conn.generation == generation {
            conn.last_ok = Some(Instant::now());
        }
    }

    /// Drops connection `generation` if it is still the current one.
    pub(crate) async fn broken(&self, generation: u64) {
        let mut conn = self.inner.conn.lock().await;
        if conn.generation == generation {
            conn.raw = None;
        }
    }
}

/// Pauses between attempts: 20 ms, doubling up to 500 ms.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(Duration::from_millis(20))
    }

    pub(crate) async fn sleep(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_millis(500));
    }

    pub(crate) fn reset(&mut self) {
        *self = Self::new();
    }
}

/// Whether ttrpc failed a call before its request was written: the connection's
/// writer was already gone (or the request was withdrawn).
fn never_sent(e: &ttrpc::Error) -> bool {
    match e {
        ttrpc::Error::LocalClosed => true,
        ttrpc::Error::Others(m) => m.starts_with("reserve channel capacity failed"),
        _ => false,
    }
}

/// keel's error for a failed ttrpc call. Only a broken connection is
/// [`Error::Transport`] (and so retried or reported as of unknown outcome); a
/// client-side deadline is DeadlineExceeded, anything else ttrpc fails with
/// locally (an oversized request, an undecodable answer) is Internal.
pub(crate) fn classify(e: ttrpc::Error) -> Error {
    if never_sent(&e) {
        return Error::Transport(e.to_string());
    }
    match e {
        ttrpc::Error::RpcStatus(s) => Error::from_status(&s),
        ttrpc::Error::Socket(_)
        | ttrpc::Error::LocalClosed
        | ttrpc::Error::RemoteClosed
        | ttrpc::Error::Eof
        | ttrpc::Error::Nix(_) => Error::Transport(e.to_string()),
        ttrpc::Error::Others(m) if m.contains("deadline") => Error::DeadlineExceeded(m),
        other => Error::Internal(other.to_string()),
    }
}

impl Lease {
    /// The connection's number, for [`Client::broken`].
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }
}

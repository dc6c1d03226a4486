//! ttrpc services. Handlers stay thin: authorise and validate, ask the owning actor
//! (or read the store on the blocking pool), map the result.

pub mod containers;
pub mod content;
pub mod events;
pub mod shim_events;
pub mod tasks;
pub mod version;

use std::sync::OnceLock;

use futures::FutureExt;
use keel_actors::supervision::{self, Decision, Escalation, Escalations, Supervisor};
use keel_protocol::filters::Filter;
use keel_protocol::limits::Limits;
use keel_protocol::Error;

/// Maps a library result onto the wire through keel's one error mapping.
pub(crate) trait Rpc<T> {
    fn rpc(self) -> ttrpc::Result<T>;
}

impl<T, E: Into<Error>> Rpc<T> for Result<T, E> {
    fn rpc(self) -> ttrpc::Result<T> {
        self.map_err(|e| ttrpc::Error::from(e.into()))
    }
}

/// Runs blocking store work (sled reads, file metadata, hashing) off the RPC threads.
pub(crate) async fn blocking<T, E, F>(f: F) -> ttrpc::Result<T>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    E: Into<Error> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))
        .rpc()?
        .rpc()
}

/// Parses a request's filters under the limits, on the blocking pool: even bounded,
/// compiling many regular expressions takes longer than the serving thread may be
/// held.
pub(crate) async fn filters(filters: Vec<String>, limits: &Limits) -> ttrpc::Result<Filter> {
    let limits = limits.filters();
    if filters.iter().all(|f| !f.contains("~=")) && filters.len() <= 4 {
        // No regular expression: parsing is a scan of a few bytes.
        return Filter::parse_all_within(&filters, &limits).rpc();
    }
    blocking(move || Filter::parse_all_within(&filters, &limits)).await
}

/// The API's supervisor and the root's inbox, set once at startup.
static API: OnceLock<(Supervisor, Escalations)> = OnceLock::new();

/// Puts the request handlers under `supervisor` (escalating to `root`).
pub fn supervise(supervisor: Supervisor, root: Escalations) {
    let _ = API.set((supervisor, root));
}

/// Runs a request handler's body. A panic in it fails that request alone, with
/// Internal, and is logged and counted by the API's supervisor (which escalates to
/// the root past its intensity); keeld goes on serving. Each request is its own
/// task, so nothing else needs restarting; what the handler held (locks are all
/// poison-tolerant, records single writes) is released as the panic unwinds.
pub(crate) async fn guarded<T>(
    method: &'static str,
    body: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> ttrpc::Result<T> {
    // Fault injection (tests only): the handler of `method` panics.
    #[cfg(feature = "faults")]
    let body = async {
        keel_storage::faults::check(&format!("api:{method}"));
        body.await
    };
    match std::panic::AssertUnwindSafe(body).catch_unwind().await {
        Ok(r) => r,
        Err(payload) => {
            let cause = supervision::panic_cause(&*payload);
            if let Some((api, root)) = API.get() {
                if api.failed(method, &cause) == Decision::Escalate {
                    let _ = root.send(Escalation {
                        from: api.name().to_string(),
                        cause: format!("{method}: {cause}"),
                    });
                }
            } else {
                tracing::error!(method, cause = %cause, "a request handler panicked");
            }
            Err(Error::Internal(format!(
                "{method} failed inside keeld ({cause}); nothing else was affected"
            ))
            .into())
        }
    }
}

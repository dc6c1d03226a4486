//! ttrpc services. Handlers stay thin: authorise and validate, ask the owning actor
//! (or read the store on the blocking pool), map the result.

pub mod containers;
pub mod content;
pub mod events;
pub mod shim_events;
pub mod tasks;
pub mod version;

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

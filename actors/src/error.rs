//! Errors of the actor layer.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] keel_storage::Error),
    /// The actor is gone (keeld is shutting down) or its mailbox is closed.
    #[error("{0} is not running")]
    ActorGone(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for keel_protocol::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Storage(e) => e.into(),
            Error::ActorGone(what) => {
                keel_protocol::Error::Unavailable(format!("{what} is not running"))
            }
        }
    }
}

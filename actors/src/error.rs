//! Errors of the actor layer.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Storage(#[from] keel_storage::Error),
    #[error(transparent)]
    Protocol(#[from] keel_protocol::Error),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Launching or cleaning up a shim failed.
    #[error("shim: {0}")]
    Shim(String),
    #[error("{0}")]
    Io(String),
    /// Too many requests are waiting for the actor.
    #[error("{0}")]
    Busy(String),
    /// Something in keeld failed while handling the request (an actor panicked).
    #[error("{0}")]
    Internal(String),
    /// The actor is gone (keeld is shutting down) or its mailbox is closed.
    #[error("{0} is not running")]
    ActorGone(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for keel_protocol::Error {
    fn from(e: Error) -> Self {
        use keel_protocol::Error as P;
        match e {
            Error::Storage(e) => e.into(),
            Error::Protocol(e) => e,
            Error::InvalidArgument(m) => P::InvalidArgument(m),
            Error::NotFound(m) => P::NotFound(m),
            Error::AlreadyExists(m) => P::AlreadyExists(m),
            Error::FailedPrecondition(m) => P::FailedPrecondition(m),
            e @ (Error::Shim(_) | Error::Io(_)) => P::Internal(e.to_string()),
            Error::Busy(m) => P::Unavailable(m),
            Error::Internal(m) => P::Internal(m),
            Error::ActorGone(what) => P::Unavailable(format!("{what} is not running")),
        }
    }
}

//! Errors of the storage layer, and their one conversion into keel's wire errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another writer holds the ref.
    #[error("{0}")]
    Locked(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata: {0}")]
    Db(String),
    #[error("corrupt metadata: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Db(e.to_string())
    }
}

impl From<sled::transaction::TransactionError<Error>> for Error {
    fn from(e: sled::transaction::TransactionError<Error>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => e.into(),
        }
    }
}

impl From<Error> for keel_protocol::Error {
    fn from(e: Error) -> Self {
        use keel_protocol::Error as P;
        match e {
            Error::InvalidArgument(m) => P::InvalidArgument(m),
            Error::NotFound(m) => P::NotFound(m),
            Error::AlreadyExists(m) => P::AlreadyExists(m),
            Error::FailedPrecondition(m) => P::FailedPrecondition(m),
            Error::Locked(m) => P::Unavailable(m),
            e @ (Error::Io { .. } | Error::Db(_) | Error::Corrupt(_)) => P::Internal(e.to_string()),
        }
    }
}

//! keel's wire errors and the one mapping between them and ttrpc status codes.
//!
//! Library crates keep their own error enums and convert into [`Error`]; handlers
//! return `ttrpc::Result`, and `From<Error> for ttrpc::Error` is the only place a
//! status code is chosen. Clients get the same enum back from a status, so they can
//! act on the code and never need to match message text.

use ttrpc::{Code, Status};

/// An error as it travels between keeld and its clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A bound on what one client may hold or ask for (requests in flight, writers,
    /// bytes) is reached; the message names the bound.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("unimplemented: {0}")]
    Unimplemented(String),
    #[error("cancelled: {0}")]
    Cancelled(String),
    #[error("internal: {0}")]
    Internal(String),
    /// The connection failed before a status came back (client side only).
    #[error("transport: {0}")]
    Transport(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The ttrpc status code this error is sent with.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unavailable(_) | Error::Transport(_) => Code::UNAVAILABLE,
            Error::PermissionDenied(_) => Code::PERMISSION_DENIED,
            Error::ResourceExhausted(_) => Code::RESOURCE_EXHAUSTED,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Cancelled(_) => Code::CANCELLED,
            Error::Internal(_) => Code::INTERNAL,
        }
    }

    /// The message without the code's prefix.
    pub fn message(&self) -> &str {
        match self {
            Error::InvalidArgument(m)
            | Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::FailedPrecondition(m)
            | Error::Unavailable(m)
            | Error::PermissionDenied(m)
            | Error::ResourceExhausted(m)
            | Error::DeadlineExceeded(m)
            | Error::Unimplemented(m)
            | Error::Cancelled(m)
            | Error::Internal(m)
            | Error::Transport(m) => m,
        }
    }

    /// Rebuilds the error a server sent as a status.
    pub fn from_status(status: &Status) -> Self {
        let m = status.message.clone();
        match status.code() {
            Code::INVALID_ARGUMENT | Code::OUT_OF_RANGE => Error::InvalidArgument(m),
            Code::NOT_FOUND => Error::NotFound(m),
            Code::ALREADY_EXISTS => Error::AlreadyExists(m),
            Code::FAILED_PRECONDITION | Code::ABORTED => Error::FailedPrecondition(m),
            Code::UNAVAILABLE => Error::Unavailable(m),
            Code::RESOURCE_EXHAUSTED => Error::ResourceExhausted(m),
            Code::PERMISSION_DENIED | Code::UNAUTHENTICATED => Error::PermissionDenied(m),
            Code::DEADLINE_EXCEEDED => Error::DeadlineExceeded(m),
            Code::UNIMPLEMENTED => Error::Unimplemented(m),
            Code::CANCELLED => Error::Cancelled(m),
            Code::OK | Code::UNKNOWN | Code::INTERNAL | Code::DATA_LOSS => Error::Internal(m),
        }
    }

    /// Whether a client may retry the same call later.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Transport(_))
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.message()))
    }
}

impl From<ttrpc::Error> for Error {
    fn from(e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(status) => Error::from_status(&status),
            other => Error::Transport(other.to_string()),
        }
    }
}

impl From<protobuf::Error> for Error {
    fn from(e: protobuf::Error) -> Self {
        Error::InvalidArgument(format!("malformed message: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<(Error, Code)> {
        vec![
            (Error::InvalidArgument("id".into()), Code::INVALID_ARGUMENT),
            (Error::NotFound("x".into()), Code::NOT_FOUND),
            (Error::AlreadyExists("x".into()), Code::ALREADY_EXISTS),
            (
                Error::FailedPrecondition("x".into()),
                Code::FAILED_PRECONDITION,
            ),
            (Error::Unavailable("x".into()), Code::UNAVAILABLE),
            (Error::PermissionDenied("x".into()), Code::PERMISSION_DENIED),
            (
                Error::ResourceExhausted("x".into()),
                Code::RESOURCE_EXHAUSTED,
            ),
            (Error::DeadlineExceeded("x".into()), Code::DEADLINE_EXCEEDED),
            (Error::Unimplemented("x".into()), Code::UNIMPLEMENTED),
            (Error::Cancelled("x".into()), Code::CANCELLED),
            (Error::Internal("x".into()), Code::INTERNAL),
        ]
    }

    #[test]
    fn every_error_maps_to_its_own_code_and_back() {
        for (err, code) in all() {
            let wire: ttrpc::Error = err.clone().into();
            let ttrpc::Error::RpcStatus(status) = &wire else {
                panic!("{err:?} did not become a status");
            };
            assert_eq!(status.code(), code, "{err:?}");
            assert_eq!(status.message, err.message(), "message travels unprefixed");
            assert_eq!(Error::from(wire), err, "round trip of {code:?}");
        }
    }

    #[test]
    fn codes_are_distinct() {
        let codes: std::collections::HashSet<_> = all().iter().map(|(_, c)| *c as i32).collect();
        assert_eq!(codes.len(), all().len());
    }

    #[test]
    fn transport_failures_are_unavailable_and_retriable() {
        let e = Error::from(ttrpc::Error::Socket("early eof".into()));
        assert!(matches!(e, Error::Transport(_)));
        assert_eq!(e.code(), Code::UNAVAILABLE);
        assert!(e.is_retriable());
        assert!(!Error::NotFound("x".into()).is_retriable());
    }

    #[test]
    fn unknown_status_is_internal() {
        let s = ttrpc::get_status(Code::UNKNOWN, "boom");
        assert_eq!(Error::from_status(&s), Error::Internal("boom".into()));
    }
}

//! keel's ttrpc API: generated messages and services, the typed client, the shim
//! (containerd.task.v2) client, identifier rules and the one error→status mapping.

pub mod checkpoint;
pub mod client;
pub mod error;
pub mod filters;
pub mod identifiers;
pub mod limits;
pub mod shim;
pub mod types;
pub mod validate;

pub use client::Client;
pub use error::{Error, Result};

/// Generated code. Each module holds one `.proto` file's messages; `*_ttrpc` modules
/// hold its services (async server traits, `create_*` registration and clients).
#[allow(
    warnings,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations,
    unused_qualifications,
    unsafe_op_in_unsafe_fn,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unreachable_pub,
    dead_code,
    missing_docs
)]
pub mod api {
    macro_rules! generated {
        ($($name:ident),* $(,)?) => {
            $(pub mod $name {
                include!(concat!(env!("OUT_DIR"), "/keel/", stringify!($name), ".rs"));
            })*
        };
    }
    generated!(
        types,
        version,
        version_ttrpc,
        containers,
        containers_ttrpc,
        tasks,
        tasks_ttrpc,
        events,
        events_ttrpc,
        content,
        content_ttrpc,
    );
}

/// containerd's own message types (events, shim task API, runc options), re-exported
/// so that keel's events carry exactly what containerd consumers decode.
pub use containerd_shim_protos as containerd;
pub use protobuf;
pub use ttrpc;

/// ttrpc metadata key carrying the namespace, as containerd sends it.
pub const NAMESPACE_KEY: &str = "containerd-namespace-ttrpc";
/// keeld's socket when none is configured.
pub const DEFAULT_ADDRESS: &str = "/run/keel/keel.sock";
/// Namespace used when a request names none.
pub const DEFAULT_NAMESPACE: &str = "default";

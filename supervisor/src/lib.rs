//! keeld, keel's daemon. The daemon binary only wires the layers together:
//! configuration, observability, the ttrpc server and its services, and the actors
//! that own state. keelctl, the command line, is a crate of its own on keel-client.

pub mod config;
pub mod daemon;
pub mod observability;
pub mod root;
pub mod server;
pub mod services;

/// keel's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision keel was built from.
pub const REVISION: &str = env!("KEEL_GIT_REVISION");

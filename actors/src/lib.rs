//! keel's actors. Callers use the handle types exported here; actix stays an
//! implementation detail of this crate.
//!
//! - [`storage::StorageHandle`]: the storage actor, which owns every mutation of the
//!   content store and runs on a thread of its own.
//! - [`events::EventSink`]: the event exchange (sequence numbers, durable log, replay).
//! - [`monitor::MonitorHandle`]: the monitor, which records exits and publishes task
//!   events.
//! - [`task::Tasks`]: one actor per task supervising its shim, the registry of them,
//!   and their restore after a restart ([`restore`]).

pub mod bundle;
pub mod error;
pub mod events;
pub mod monitor;
pub mod reconcile;
pub mod restore;
pub mod runtime_options;
pub mod shim;
pub mod state;
pub mod storage;
pub mod supervision;
pub mod task;

pub use error::{Error, Result};

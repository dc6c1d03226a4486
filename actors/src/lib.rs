//! keel's actors. Callers use the handle types exported here; actix stays an
//! implementation detail of this crate.
//!
//! - [`storage::StorageHandle`]: the storage actor, which owns every mutation of the
//!   content store and runs on a thread of its own.

pub mod error;
pub mod events;
pub mod monitor;
pub mod shim;
pub mod state;
pub mod storage;
pub mod task;

pub use error::{Error, Result};

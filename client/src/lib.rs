//! keel-client: the Rust client library of keeld, in the shape of containerd's
//! client package.
//!
//! A [`Client`] is one connection to keeld in one namespace. It reconnects by
//! itself when keeld restarts: calls made while keeld is down wait for it (up to
//! [`ClientBuilder::reconnect_timeout`]) and then fail with
//! [`Error::Unavailable`]. From it come
//!
//! - [`Containers`]: containers created from a [`ContainerSpec`], listed with
//!   containerd's filters, updated, deleted;
//! - [`Task`] and [`Process`]: `start`, `wait` (which survives a keeld restart and
//!   resolves with the exit keeld recorded), `kill`, `pause`, `resume`, `exec`,
//!   `pids`, `close_stdin`, `resize`, `update`, `metrics`, `checkpoint`, `delete`;
//! - [`io`]: the process's stdio as FIFOs streamed to `AsyncRead`/`AsyncWrite`,
//!   the caller's files, a log file, nothing at all, or re-attached to a task a
//!   previous client started;
//! - [`events`]: a `Stream` of typed events with their sequence numbers that
//!   resumes across keeld restarts and dropped connections with no gap and no
//!   duplicate, and surfaces the gaps keeld reports as items of their own.
//!
//! Every error is one [`Error`] whose variant is the ttrpc status code, so callers
//! match on it and never on message text.
//!
//! # Example: run a command and wait for it
//!
//! ```no_run
//! use keel_client::{Client, ContainerSpec, io::Io};
//!
//! # async fn run() -> keel_client::Result<()> {
//! let client = Client::connect("/run/keel/keel.sock").await?;
//! let container = client
//!     .containers()
//!     .create(ContainerSpec::new("hello", "/srv/rootfs").args(["echo", "hi"]))
//!     .await?;
//! let task = container.new_task(Io::null()).await?;
//! let exit = task.wait_after_start().await?;
//! println!("exited with {}", exit.code);
//! task.delete(false).await?;
//! container.delete().await?;
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod checkpoint;
pub mod client;
pub mod containers;
pub mod events;
pub mod io;
pub mod metrics;
pub mod task;

pub use checkpoint::CheckpointOptions;
pub use client::{Client, ClientBuilder};
pub use containers::{Container, ContainerSpec, Containers, Limits};
pub use events::{Envelope, Event, Subscription};
pub use metrics::Metrics;
pub use task::{ExitStatus, Process, ProcessInfo, Status, Task, TaskState};

/// keel's wire protocol (generated messages and stubs), for what this library
/// does not wrap.
pub use keel_protocol as protocol;
/// The one error type: its variant is the ttrpc status code
/// ([`Error::code`]); [`Error::Transport`] when no status came back.
pub use keel_protocol::{Error, Result};

pub use keel_protocol::{DEFAULT_ADDRESS, DEFAULT_NAMESPACE};

//! The bounds on what one client may send or hold, with their defaults.
//!
//! Every input a client controls is bounded by one of these, and each is a key of
//! the `[limits]` table of `keel.toml` (same name, same unit). A request over a
//! bound that describes its *shape* (a filter, a label, a spec) fails with
//! InvalidArgument naming the field; one that asks for more than keeld gives any one
//! client at a time (requests in flight, concurrent ingests) fails with
//! ResourceExhausted.
//!
//! ttrpc itself bounds one frame at 4 MiB ([`FRAME_BYTES`]); nothing here can raise
//! that.

use serde::Deserialize;

/// The largest ttrpc frame, fixed by ttrpc (`MESSAGE_LENGTH_MAX`). Every request and
/// every stream message is at most this big.
pub const FRAME_BYTES: usize = 4 << 20;

/// The bounds in force. `Default` gives keel's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Connections open at once; more are refused at accept. Each running task's
    /// shim holds one to forward its events.
    pub connections: usize,
    /// Requests one connection may have in flight (streams included, until they
    /// end). Beyond it requests fail with ResourceExhausted; a client that goes on
    /// to twice this many (it does not read its answers) has its connection closed.
    pub requests_per_connection: usize,
    /// Bytes of stream messages (content writes) a connection may have sent that
    /// keeld has not consumed yet; a client that sends more has its connection
    /// closed.
    pub stream_bytes_per_connection: usize,

    /// Bytes of one filter string.
    pub filter_bytes: usize,
    /// Filters (OR-ed) in one request.
    pub filters_per_request: usize,
    /// Selectors (AND-ed, comma-separated) in one filter.
    pub selectors_per_filter: usize,
    /// Size one compiled `~=` regular expression may reach (the regex crate's
    /// `size_limit`, also its lazy DFA's cache limit).
    pub regex_bytes: usize,

    /// Labels on one container or blob, annotations on one task update.
    pub labels_per_object: usize,
    /// Bytes of one label's key plus value (containerd's rule: 4096).
    pub label_bytes: usize,

    /// Bytes of an OCI JSON document in a request: a container's spec, an exec
    /// process, an update's resources.
    pub spec_bytes: usize,
    /// Mounts of one rootfs.
    pub mounts: usize,
    /// Bytes of a path or URI in a request (stdio, image path, mount source).
    pub path_bytes: usize,

    /// Bytes of one published or forwarded event's payload.
    pub event_bytes: usize,
    /// Bytes of an event topic.
    pub topic_bytes: usize,

    /// Ingests (content writers) open at once, over all clients.
    pub writers: usize,
    /// Bytes of out-of-order writes one ingest stream may have waiting for an
    /// earlier one.
    pub writer_buffer_bytes: usize,

    /// Bytes a checkpoint image may unpack to (its files' sizes summed).
    pub checkpoint_bytes: u64,
    /// Entries (files and directories) of one checkpoint image.
    pub checkpoint_entries: usize,
    /// Bytes of a checkpoint's index (the OCI image index naming its blobs).
    pub checkpoint_index_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 8192,
            requests_per_connection: 1024,
            stream_bytes_per_connection: 64 << 20,
            filter_bytes: 1024,
            filters_per_request: 16,
            selectors_per_filter: 32,
            regex_bytes: 1 << 20,
            labels_per_object: 256,
            label_bytes: 4096,
            spec_bytes: 1 << 20,
            mounts: 64,
            path_bytes: 4096,
            event_bytes: 1 << 20,
            topic_bytes: 256,
            writers: 32,
            writer_buffer_bytes: 16 << 20,
            checkpoint_bytes: 16 << 30,
            checkpoint_entries: 100_000,
            checkpoint_index_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// Checks that every bound is usable (positive, and what must fit in one frame
    /// does); names the first that is not.
    pub fn check(&self) -> Result<(), String> {
        let positive = [
            ("connections", self.connections),
            ("requests_per_connection", self.requests_per_connection),
            (
                "stream_bytes_per_connection",
                self.stream_bytes_per_connection,
            ),
            ("filter_bytes", self.filter_bytes),
            ("filters_per_request", self.filters_per_request),
            ("selectors_per_filter", self.selectors_per_filter),
            ("regex_bytes", self.regex_bytes),
            ("labels_per_object", self.labels_per_object),
            ("label_bytes", self.label_bytes),
            ("spec_bytes", self.spec_bytes),
            ("mounts", self.mounts),
            ("path_bytes", self.path_bytes),
            ("event_bytes", self.event_bytes),
            ("topic_bytes", self.topic_bytes),
            ("writers", self.writers),
            ("writer_buffer_bytes", self.writer_buffer_bytes),
            ("checkpoint_entries", self.checkpoint_entries),
            ("checkpoint_index_bytes", self.checkpoint_index_bytes),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("limits.{name} must be at least 1"));
        }
        if self.checkpoint_bytes == 0 {
            return Err("limits.checkpoint_bytes must be at least 1".into());
        }
        if self.stream_bytes_per_connection < FRAME_BYTES {
            return Err(format!(
                "limits.stream_bytes_per_connection must hold one frame ({FRAME_BYTES} bytes)"
            ));
        }
        Ok(())
    }

    /// The bounds a filter is parsed under.
    pub fn filters(&self) -> crate::filters::FilterLimits {
        crate::filters::FilterLimits {
            filter_bytes: self.filter_bytes,
            filters: self.filters_per_request,
            selectors: self.selectors_per_filter,
            regex_bytes: self.regex_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_usable_and_zero_is_named() {
        Limits::default().check().unwrap();
        let l = Limits {
            writers: 0,
            ..Limits::default()
        };
        assert_eq!(l.check().unwrap_err(), "limits.writers must be at least 1");
        let l = Limits {
            stream_bytes_per_connection: 1024,
            ..Limits::default()
        };
        assert!(l.check().unwrap_err().contains("one frame"));
    }
}

//! keel's fuzz targets: every decoder and validator a client's bytes reach.
//!
//! Each target takes arbitrary bytes and must return without panicking, whatever
//! they are. The bodies live here, in the workspace, so that two things run them:
//! - `fuzz/libfuzzer` (built by `bench/fuzz.sh`, outside the workspace, with
//!   libFuzzer's coverage instrumentation on the stable toolchain) explores;
//! - the `replays_the_corpus` test runs every input kept under `fuzz/corpus/` on
//!   every `cargo test`, so CI replays the seeds and every finding.
//!
//! `cargo run -p keel-fuzz --example seeds` writes the seed inputs (one
//! well-formed input of each kind) after a target changes.
//!
//! | target | what the bytes are |
//! | --- | --- |
//! | `requests` | a request message (one kind per first byte) with its `Any` payloads and JSON specs, checked as keeld's handlers check it |
//! | `filters` | filter strings (one per line), parsed and matched |
//! | `identifiers` | ids, namespaces, refs, digests and runtime names |
//! | `checkpoint_index` | an OCI image index read as a checkpoint |
//! | `checkpoint_tar` | a CRIU image tar, checked before unpacking |
//! | `event_log` | a segment of the event log, read back record by record |
//! | `payloads` | an event payload of each known type, decoded and read as a filter does |

use std::collections::HashMap;

use keel_protocol::api::{containers, content, events, tasks};
use keel_protocol::filters::{Adaptor, Filter};
use keel_protocol::limits::Limits;
use keel_protocol::types::{event_json, DecodedEvent};
use keel_protocol::{identifiers, validate};
use protobuf::well_known_types::any::Any;
use protobuf::Message;

/// A fuzz target: takes any bytes, must not panic.
pub type Target = fn(&[u8]);

/// The targets, by name, for the harness and the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("requests", requests),
    ("filters", filters),
    ("identifiers", identifiers),
    ("checkpoint_index", checkpoint_index),
    ("checkpoint_tar", checkpoint_tar),
    ("event_log", event_log),
    ("payloads", payloads),
];

/// Smaller bounds than keeld's defaults, so the fuzzer reaches them.
pub fn limits() -> Limits {
    Limits {
        labels_per_object: 8,
        label_bytes: 64,
        spec_bytes: 64 << 10,
        mounts: 4,
        path_bytes: 128,
        event_bytes: 64 << 10,
        topic_bytes: 64,
        filter_bytes: 256,
        filters_per_request: 4,
        selectors_per_filter: 8,
        regex_bytes: 64 << 10,
        checkpoint_bytes: 1 << 20,
        checkpoint_entries: 64,
        ..Limits::default()
    }
}

/// Reads an event payload's fields as `event.<field>` selectors do.
fn read_payload(any: &Any) {
    let decoded = DecodedEvent::decode(any);
    for field in ["container_id", "id", "pid", "exit_status", "exited_at", "x"] {
        let _ = decoded.field(field);
    }
    let _ = event_json(any);
}

/// Request kinds, by the first byte of the input (modulo their number).
const REQUEST_KINDS: u8 = 11;

/// A request, checked in the order keeld's handler checks it.
pub fn requests(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let l = limits();
    match kind % REQUEST_KINDS {
        0 => {
            let Ok(r) = containers::CreateContainerRequest::parse_from_bytes(body) else {
                return;
            };
            let Some(c) = r.container.as_ref() else {
                return;
            };
            let _ = identifiers::validate("container.id", &c.id)
                .and_then(|()| validate::labels("container.labels", &c.labels, &l))
                .and_then(|()| validate::spec("container.spec", c.spec.as_ref(), &l))
                .and_then(|_| validate::mounts("container.rootfs", &c.rootfs, &l));
            if let Some(rt) = c.runtime.as_ref() {
                let _ = validate::path("container.runtime.name", &rt.name, &l)
                    .map(|()| keel_actors::shim::resolve_runtime_in(&rt.name, "".as_ref()));
            }
        }
        1 => {
            let Ok(r) = containers::UpdateContainerRequest::parse_from_bytes(body) else {
                return;
            };
            if let Some(c) = r.container.as_ref() {
                let _ = validate::labels("container.labels", &c.labels, &l);
                let _ = validate::spec("container.spec", c.spec.as_ref(), &l);
            }
        }
        2 => {
            let Ok(r) = tasks::CreateTaskRequest::parse_from_bytes(body) else {
                return;
            };
            let _ = identifiers::validate("container_id", &r.container_id);
            for v in [&r.stdin, &r.stdout, &r.stderr] {
                let _ = validate::path("stdio", v, &l);
            }
            if let Some(d) = r.checkpoint.as_ref() {
                let _ = keel_storage::Digest::parse("checkpoint", &d.digest);
            }
            let _ = validate::mounts("rootfs", &r.rootfs, &l);
        }
        3 => {
            let Ok(r) = tasks::ExecProcessRequest::parse_from_bytes(body) else {
                return;
            };
            let _ = identifiers::validate("exec_id", &r.exec_id);
            let _ = validate::process("spec", r.spec.as_ref(), r.terminal, &l);
        }
        4 => {
            let Ok(r) = tasks::UpdateTaskRequest::parse_from_bytes(body) else {
                return;
            };
            if let Some(res) = r.resources.as_ref() {
                let _ = validate::resources("resources", res, &l);
            }
            let _ = validate::labels("annotations", &r.annotations, &l);
        }
        5 => {
            let Ok(r) = events::PublishRequest::parse_from_bytes(body) else {
                return;
            };
            if validate::client_event("topic", &r.topic, "event", r.event.as_ref(), &l).is_ok() {
                read_payload(r.event.get_or_default());
            }
        }
        6 => {
            let Ok(r) = events::ForwardRequest::parse_from_bytes(body) else {
                return;
            };
            let env = r.envelope.get_or_default();
            let _ = identifiers::validate("envelope.namespace", &env.namespace);
            let _ = validate::client_event("topic", &env.topic, "event", env.event.as_ref(), &l);
        }
        7 => {
            // What a shim forwards.
            let Ok(r) = keel_protocol::containerd::api::ForwardRequest::parse_from_bytes(body)
            else {
                return;
            };
            let env = r.envelope.get_or_default();
            let _ = validate::topic("envelope.topic", &env.topic, &l);
            if let Ok(any) = validate::payload("envelope.event", env.event.as_ref(), &l) {
                let id = keel_protocol::types::event_field(any, "container_id");
                let _ = identifiers::validate("container_id", &id.unwrap_or_default());
                let _ = keel_protocol::types::unpack::<
                    keel_protocol::containerd::events::task::TaskExit,
                >(any);
            }
        }
        8 => {
            let Ok(r) = events::SubscribeRequest::parse_from_bytes(body) else {
                return;
            };
            match_filters(&r.filters, &l);
        }
        9 => {
            let Ok(r) = content::WriteContentRequest::parse_from_bytes(body) else {
                return;
            };
            let _ = keel_storage::digest::validate_ref(&r.ref_);
            let _ = validate::labels("labels", &r.labels, &l);
            if !r.expected.is_empty() {
                let _ = keel_storage::Digest::parse("expected", &r.expected);
            }
        }
        _ => {
            let Ok(r) = content::UpdateRequest::parse_from_bytes(body) else {
                return;
            };
            let info = r.info.get_or_default();
            let _ = keel_storage::Digest::parse("info.digest", &info.digest);
            let _ = validate::labels("info.labels", &info.labels, &l);
        }
    }
}

/// Fields an event offers a filter.
struct Fields<'a> {
    topic: &'a str,
    namespace: &'a str,
    event: &'a DecodedEvent,
    labels: &'a HashMap<String, String>,
}

impl Adaptor for Fields<'_> {
    fn field(&self, path: &[String]) -> Option<String> {
        match path {
            [f] if f == "topic" => Some(self.topic.to_string()),
            [f] if f == "namespace" => Some(self.namespace.to_string()),
            [f, name] if f == "event" => self.event.field(name),
            [f, k] if f == "labels" => self.labels.get(k).cloned(),
            _ => None,
        }
    }
}

fn match_filters(filters: &[String], l: &Limits) {
    let Ok(f) = Filter::parse_all_within(filters, &l.filters()) else {
        return;
    };
    let exit = keel_protocol::containerd::events::task::TaskExit {
        container_id: "web".into(),
        id: "web".into(),
        exit_status: 137,
        ..Default::default()
    };
    let any = keel_protocol::types::pack(&exit).expect("encode");
    let decoded = DecodedEvent::decode(&any);
    let labels = HashMap::from([("app".to_string(), "web".to_string())]);
    for (topic, namespace) in [("/tasks/exit", "default"), ("/x/y", "bb"), ("", "")] {
        let _ = f.matches(&Fields {
            topic,
            namespace,
            event: &decoded,
            labels: &labels,
        });
    }
    let _ = (f.reads_payload(), f.selectors(), f.is_always());
}

/// Filter strings, one per line, parsed and matched.
pub fn filters(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let filters: Vec<String> = text.split('\n').map(str::to_string).collect();
    match_filters(&filters, &limits());
}

/// One identifier-like string, checked by every rule that takes one.
pub fn identifiers(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let _ = identifiers::validate("id", &s);
    let _ = keel_storage::digest::validate_ref(&s);
    let _ = keel_storage::Digest::parse("digest", &s);
    let _ = keel_actors::shim::resolve_runtime_in(&s, "".as_ref());
    let _ = validate::topic("topic", &s, &limits());
    let _ = validate::is_reserved_topic(&s);
}

/// A checkpoint's index.
pub fn checkpoint_index(data: &[u8]) {
    let digest = format!("sha256:{}", "0".repeat(64));
    let _ = keel_protocol::checkpoint::Checkpoint::parse(&digest, data);
}

/// A CRIU image tar, checked as a restore checks it before unpacking.
pub fn checkpoint_tar(data: &[u8]) {
    let _ = keel_actors::task::check_image_tar(data, &limits());
}

/// A segment of the event log, read back; each record decoded as a restart does.
pub fn event_log(data: &[u8]) {
    let mut kept = Vec::new();
    let _ = keel_storage::events::read_records(
        data,
        data.len() as u64,
        0,
        &keel_actors::events::sequence_of,
        &mut |seq, bytes| kept.push((seq, bytes)),
    );
    for (_, bytes) in kept {
        if let Ok(env) = events::Envelope::parse_from_bytes(&bytes) {
            if let Some(any) = env.event.as_ref() {
                read_payload(any);
            }
        }
    }
}

/// Type URLs of the payloads keel decodes, by the first byte of the input.
const PAYLOAD_TYPES: &[&str] = &[
    "containerd.events.TaskExit",
    "containerd.events.TaskCreate",
    "containerd.events.TaskOOM",
    "containerd.events.ContainerCreate",
    "containerd.events.ContentDelete",
    "containerd.events.ImageCreate",
    "containerd.events.NamespaceCreate",
    "containerd.events.SnapshotPrepare",
    "google.protobuf.Struct",
    "keel.services.events.v1.Gap",
    "type.googleapis.com/containerd.events.TaskExit",
    "",
    "/",
    ".",
    "..",
];

/// An event payload: a type URL picked by the first byte, the rest its value.
pub fn payloads(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let type_url = PAYLOAD_TYPES[usize::from(kind) % PAYLOAD_TYPES.len()];
    let any = Any {
        type_url: type_url.to_string(),
        value: body.to_vec(),
        ..Default::default()
    };
    read_payload(&any);
    // The JSON form `keelctl events publish` sends (its parsing runs client-side,
    // but its output is what keeld then decodes).
    if let Ok(text) = std::str::from_utf8(body) {
        if let Ok(any) = keel_protocol::types::event_from_json(type_url, text) {
            read_payload(&any);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input under `fuzz/corpus/<target>/` through its target: the seeds and
    /// everything a fuzzing run found and kept.
    #[test]
    fn replays_the_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let mut total = 0;
        for (name, target) in TARGETS {
            let dir = root.join(name);
            let entries =
                std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
            let mut n = 0;
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                target(&data);
                n += 1;
            }
            assert!(n > 0, "corpus {name} is empty");
            total += n;
        }
        eprintln!("replayed {total} corpus inputs");
    }
}

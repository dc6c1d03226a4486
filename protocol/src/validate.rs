//! Checks of what clients send, shared by keeld's handlers and the fuzz targets.
//!
//! Each check takes the field's name for its error and the [`Limits`] in force, and
//! either returns the value keeld will use or an InvalidArgument naming the field.
//! None of them may panic, whatever the input: `fuzz/` runs every one of them on
//! arbitrary bytes.

use std::collections::HashMap;

use protobuf::well_known_types::any::Any;

use crate::api::types::Mount;
use crate::limits::Limits;
use crate::Error;

/// Topics only keel itself publishes: the task and container lifecycle, and keel's
/// own notices. `Publish` and `Forward` refuse them.
pub const RESERVED_TOPICS: [&str; 3] = ["/tasks/", "/containers/", "/keel/"];

fn invalid<T>(m: String) -> Result<T, Error> {
    Err(Error::InvalidArgument(m))
}

/// A message field the request cannot do without.
pub fn required<T>(field: &str, value: protobuf::MessageField<T>) -> Result<T, Error> {
    value
        .into_option()
        .ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))
}

/// Checks that `any` is a JSON document of OCI type `kind` (the last element of its
/// type URL), at most `limits.spec_bytes` long, whose top level is an object; returns
/// the object.
fn oci_json(
    field: &str,
    any: &Any,
    kind: &str,
    limits: &Limits,
) -> Result<serde_json::Map<String, serde_json::Value>, Error> {
    if any.type_url.rsplit('/').next() != Some(kind) {
        return invalid(format!(
            "{field}: type {:?} is not an OCI {kind}",
            any.type_url
        ));
    }
    if any.value.len() > limits.spec_bytes {
        return invalid(format!(
            "{field}: {} bytes of JSON, the limit is {}",
            any.value.len(),
            limits.spec_bytes
        ));
    }
    match serde_json::from_slice::<serde_json::Value>(&any.value) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(other) => invalid(format!(
            "{field}: an OCI {kind} is a JSON object, not {}",
            json_kind(&other)
        )),
        Err(e) => invalid(format!("{field}: not valid JSON: {e}")),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The arguments of an OCI process: present, and naming a program.
fn has_program(p: &oci_spec::runtime::Process) -> bool {
    p.args()
        .as_ref()
        .and_then(|a| a.first())
        .is_some_and(|a| !a.is_empty())
}

/// A container's spec: an OCI runtime `Spec` as a JSON object, with a process that
/// names a program. Returns the JSON as sent.
pub fn spec(field: &str, any: Option<&Any>, limits: &Limits) -> Result<Vec<u8>, Error> {
    let any = any.ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))?;
    let map = oci_json(field, any, "Spec", limits)?;
    let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| {
            Error::InvalidArgument(format!("{field}: not a valid OCI runtime spec: {e}"))
        })?;
    if !spec.process().as_ref().is_some_and(has_program) {
        return invalid(format!("{field}.process.args must name a program"));
    }
    Ok(any.value.clone())
}

/// The process given to Exec: an OCI `Process` as a JSON object, with arguments.
/// `terminal` overrides the process's own flag, so runc and the shim agree. Returns
/// the JSON keeld passes on.
pub fn process(
    field: &str,
    any: Option<&Any>,
    terminal: bool,
    limits: &Limits,
) -> Result<Vec<u8>, Error> {
    let any = any.ok_or_else(|| {
        Error::InvalidArgument(format!("{field}: the process to run is required"))
    })?;
    let mut map = oci_json(field, any, "Process", limits)?;
    let p: oci_spec::runtime::Process =
        serde_json::from_value(serde_json::Value::Object(map.clone())).map_err(|e| {
            Error::InvalidArgument(format!("{field}: not a valid OCI Process: {e}"))
        })?;
    if !has_program(&p) {
        return invalid(format!("{field}: process.args must name a program"));
    }
    map.insert("terminal".into(), serde_json::Value::Bool(terminal));
    serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| Error::InvalidArgument(format!("{field}: {e}")))
}

/// The resources given to Update: OCI `LinuxResources` as a JSON object. Returns the
/// JSON as sent.
pub fn resources(field: &str, any: &Any, limits: &Limits) -> Result<Vec<u8>, Error> {
    let map = oci_json(field, any, "LinuxResources", limits)?;
    serde_json::from_value::<oci_spec::runtime::LinuxResources>(serde_json::Value::Object(map))
        .map_err(|e| Error::InvalidArgument(format!("{field}: not valid LinuxResources: {e}")))?;
    Ok(any.value.clone())
}

/// Labels (or annotations): at most `labels_per_object`, keys not empty, each key and
/// value together at most `label_bytes`.
pub fn labels(field: &str, labels: &HashMap<String, String>, limits: &Limits) -> Result<(), Error> {
    if labels.len() > limits.labels_per_object {
        return invalid(format!(
            "{field}: {} given, the limit is {}",
            labels.len(),
            limits.labels_per_object
        ));
    }
    for (k, v) in labels {
        if k.is_empty() {
            return invalid(format!("{field}: a key must not be empty"));
        }
        if k.len() + v.len() > limits.label_bytes {
            return invalid(format!(
                "{field}: {:?} is {} bytes with its value, the limit is {}",
                truncated(k),
                k.len() + v.len(),
                limits.label_bytes
            ));
        }
    }
    Ok(())
}

/// The first 64 bytes of `s` (at a character boundary), for error messages.
fn truncated(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A path or URI: at most `path_bytes`, no NUL.
/// An options `Any` a client sends (runtime or checkpoint options): its type URL
/// bounded as a path, its value at most `spec_bytes`.
pub fn options(field: &str, any: &Any, limits: &Limits) -> Result<(), Error> {
    path(&format!("{field}.type_url"), &any.type_url, limits)?;
    if any.value.len() > limits.spec_bytes {
        return invalid(format!(
            "{field}: {} bytes, the limit is {}",
            any.value.len(),
            limits.spec_bytes
        ));
    }
    Ok(())
}

pub fn path(field: &str, value: &str, limits: &Limits) -> Result<(), Error> {
    if value.len() > limits.path_bytes {
        return invalid(format!(
            "{field}: {} bytes, the limit is {}",
            value.len(),
            limits.path_bytes
        ));
    }
    if value.contains('\0') {
        return invalid(format!("{field} contains a NUL byte"));
    }
    Ok(())
}

/// Mounts of a rootfs: at most `mounts`, each with a type, and bounded paths and
/// options.
pub fn mounts(field: &str, mounts: &[Mount], limits: &Limits) -> Result<(), Error> {
    if mounts.len() > limits.mounts {
        return invalid(format!(
            "{field}: {} mounts, the limit is {}",
            mounts.len(),
            limits.mounts
        ));
    }
    for (i, m) in mounts.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if m.type_.is_empty() {
            return invalid(format!("{f}.type is required"));
        }
        path(&format!("{f}.type"), &m.type_, limits)?;
        path(&format!("{f}.source"), &m.source, limits)?;
        path(&format!("{f}.target"), &m.target, limits)?;
        if m.options.len() > limits.mounts {
            return invalid(format!(
                "{f}.options: {} options, the limit is {}",
                m.options.len(),
                limits.mounts
            ));
        }
        for o in &m.options {
            path(&format!("{f}.options"), o, limits)?;
        }
    }
    Ok(())
}

/// An event topic: a path like `/tasks/exit`, at most `topic_bytes`, no whitespace.
pub fn topic(field: &str, topic: &str, limits: &Limits) -> Result<(), Error> {
    if topic.len() > limits.topic_bytes {
        return invalid(format!(
            "{field}: {} bytes, the limit is {}",
            topic.len(),
            limits.topic_bytes
        ));
    }
    if !topic.starts_with('/')
        || topic.len() < 2
        || topic.contains(|c: char| c.is_whitespace() || c.is_control())
    {
        return invalid(format!(
            "{field} {:?} must be a path like /app/started",
            truncated(topic)
        ));
    }
    Ok(())
}

/// Whether only keel itself may publish on `topic`.
pub fn is_reserved_topic(topic: &str) -> bool {
    RESERVED_TOPICS.iter().any(|p| topic.starts_with(p))
}

/// An event a client publishes or forwards: a topic that is not reserved and a
/// payload of at most `event_bytes`. A reserved topic is PermissionDenied.
pub fn client_event(
    topic_field: &str,
    topic_value: &str,
    event_field: &str,
    event: Option<&Any>,
    limits: &Limits,
) -> Result<(), Error> {
    topic(topic_field, topic_value, limits)?;
    if is_reserved_topic(topic_value) {
        return Err(Error::PermissionDenied(format!(
            "{topic_field} {topic_value:?}: only keel publishes on /tasks/, /containers/ and /keel/"
        )));
    }
    payload(event_field, event, limits).map(|_| ())
}

/// An event's payload: present, with a type URL, at most `event_bytes`.
pub fn payload<'a>(field: &str, event: Option<&'a Any>, limits: &Limits) -> Result<&'a Any, Error> {
    let event = event.ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))?;
    let size = event.value.len() + event.type_url.len();
    if size > limits.event_bytes {
        return invalid(format!(
            "{field}: {size} bytes, the limit is {}",
            limits.event_bytes
        ));
    }
    if event.type_url.is_empty() {
        return invalid(format!("{field}.type_url is required"));
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{json_any, PROCESS_TYPE_URL, RESOURCES_TYPE_URL, SPEC_TYPE_URL};

    fn l() -> Limits {
        Limits::default()
    }

    fn err_of<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
        match r {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn documents_of_the_wrong_shape_are_invalid_arguments() {
        // Each of these is valid JSON; serde reads the first (the 16 fields of a
        // Process in order) as a Process with args ["sh"].
        let cases: &[(&str, &[u8], &str)] = &[
            (
                "Process",
                br#"[false, null, {"uid":0,"gid":0}, ["sh"], null, null, "/", null, null, null, null, null, null, null, null, null]"#,
                "not an array",
            ),
            (
                "Process",
                br#"[["sh"],{"uid":0,"gid":0},"/"]"#,
                "not an array",
            ),
            ("Process", b"\"sh\"", "not a string"),
            ("Process", b"null", "not null"),
            (
                "Process",
                br#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#,
                "name a program",
            ),
            (
                "Process",
                br#"{"args":[""],"cwd":"/","user":{"uid":0,"gid":0}}"#,
                "name a program",
            ),
            ("Process", br#"{"args":"sh"}"#, "not a valid OCI Process"),
            ("Process", b"{", "not valid JSON"),
        ];
        for (kind, json, want) in cases {
            let any = json_any(PROCESS_TYPE_URL, json.to_vec());
            let m = err_of(process("spec", Some(&any), false, &l()));
            assert!(
                m.starts_with("spec") && m.contains(want),
                "{kind} {json:?}: {m}"
            );
        }
        let ok = json_any(
            PROCESS_TYPE_URL,
            br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0},"terminal":false}"#.to_vec(),
        );
        let out = process("spec", Some(&ok), true, &l()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["terminal"], true, "the request's terminal flag wins");

        let spec_arr = json_any(SPEC_TYPE_URL, br#"["1.0.2"]"#.to_vec());
        assert!(err_of(spec("container.spec", Some(&spec_arr), &l())).contains("not an array"));
        let res_arr = json_any(RESOURCES_TYPE_URL, b"[1]".to_vec());
        assert!(err_of(resources("resources", &res_arr, &l())).contains("not an array"));
        let wrong_type = json_any("x/Spec", b"{}".to_vec());
        assert!(
            err_of(process("spec", Some(&wrong_type), false, &l())).contains("not an OCI Process")
        );
    }

    #[test]
    fn sizes_and_counts_are_bounded() {
        let small = Limits {
            spec_bytes: 16,
            labels_per_object: 2,
            label_bytes: 8,
            path_bytes: 8,
            mounts: 1,
            topic_bytes: 8,
            event_bytes: 32,
            ..Limits::default()
        };
        let big = json_any(SPEC_TYPE_URL, vec![b' '; 17]);
        assert!(err_of(spec("container.spec", Some(&big), &small))
            .contains("17 bytes of JSON, the limit is 16"));
        let three: HashMap<_, _> = (0..3).map(|i| (i.to_string(), String::new())).collect();
        assert!(err_of(labels("labels", &three, &small)).contains("3 given, the limit is 2"));
        let long: HashMap<_, _> = [("key".to_string(), "valuevalue".to_string())].into();
        assert!(err_of(labels("labels", &long, &small)).contains("13 bytes with its value"));
        let empty: HashMap<_, _> = [(String::new(), "v".to_string())].into();
        assert!(err_of(labels("labels", &empty, &small)).contains("must not be empty"));
        assert!(err_of(path("stdin", "/123456789", &small)).starts_with("stdin: 10 bytes"));
        assert!(err_of(path("stdin", "a\0b", &small)).contains("NUL"));
        let m = Mount {
            type_: "bind".into(),
            ..Default::default()
        };
        assert!(err_of(mounts("rootfs", &[m.clone(), m], &small)).contains("2 mounts"));
        assert!(err_of(topic("topic", "/a/b/c/d/e", &small)).contains("10 bytes"));
        assert!(err_of(topic("topic", "tasks", &small)).contains("must be a path"));
        assert!(err_of(topic("topic", "/a b", &small)).contains("must be a path"));
        let ev = json_any("t", vec![0; 40]);
        assert!(err_of(payload("event", Some(&ev), &small)).contains("41 bytes, the limit is 32"));
    }

    #[test]
    fn lifecycle_topics_are_keels_alone() {
        let ev = json_any("google.protobuf.Struct", vec![]);
        for t in [
            "/tasks/delete",
            "/tasks/exit",
            "/containers/delete",
            "/keel/events/gap",
        ] {
            let e = client_event("topic", t, "event", Some(&ev), &l()).unwrap_err();
            assert!(
                matches!(&e, Error::PermissionDenied(m) if m.contains(t)),
                "{t}: {e:?}"
            );
        }
        client_event("topic", "/app/deployed", "event", Some(&ev), &l()).unwrap();
        client_event("topic", "/tasksx/y", "event", Some(&ev), &l()).unwrap();
    }
}

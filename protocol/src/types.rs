//! Conversions shared by keeld and its clients: timestamps, `Any` packing with
//! containerd's type URLs, and the type URLs keel uses for JSON payloads.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::{Message, MessageFull};

use crate::Error;

/// Type URL of an OCI runtime spec carried as JSON, as containerd writes it.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// Type URL under which containerd sends OCI `LinuxResources` (as JSON) to Update.
pub const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// Type URL of an OCI process spec carried as JSON.
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";
/// Type URL of OCI LinuxResources carried as JSON.
pub const RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// Type URL of runc's runtime options, as containerd's runc shims name it (no
/// `type.googleapis.com/` prefix).
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// Type URL of runc's checkpoint options, named likewise.
pub const CHECKPOINT_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.CheckpointOptions";

/// Converts a wall-clock time into a protobuf timestamp.
pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(d.subsec_nanos()).unwrap_or(0);
    ts
}

/// The current time as a protobuf timestamp.
pub fn now() -> Timestamp {
    timestamp(SystemTime::now())
}

/// Converts a protobuf timestamp back into a wall-clock time (clamped at the epoch).
pub fn system_time(ts: &Timestamp) -> SystemTime {
    let secs = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u32::try_from(ts.nanos).unwrap_or(0);
    UNIX_EPOCH + Duration::new(secs, nanos)
}

/// RFC 3339 UTC rendering of a time, to the second: `2023-11-14T22:13:20Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, mo, d) = civil_from_days(i64::try_from(days).unwrap_or(0));
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Packs a message into an `Any` whose type URL is the bare full name
/// (`containerd.events.TaskExit`), as containerd and its shims write them.
pub fn pack<M: MessageFull>(m: &M) -> Result<Any, Error> {
    let mut any = Any::new();
    any.type_url = M::descriptor().full_name().to_string();
    any.value = m
        .write_to_bytes()
        .map_err(|e| Error::Internal(format!("encode: {e}")))?;
    Ok(any)
}

/// Unpacks an `Any` whose type URL names `M`, with or without a `type.googleapis.com/`
/// style prefix.
pub fn unpack<M: MessageFull>(any: &Any) -> Result<M, Error> {
    let want = M::descriptor().full_name().to_string();
    let got = any.type_url.rsplit('/').next().unwrap_or_default();
    if got != want {
        return Err(Error::InvalidArgument(format!(
            "payload type {:?} is not {want}",
            any.type_url
        )));
    }
    M::parse_from_bytes(&any.value)
        .map_err(|e| Error::InvalidArgument(format!("malformed {want} payload: {e}")))
}

/// Packs JSON bytes under a type URL (OCI specs travel this way).
pub fn json_any(type_url: &str, json: Vec<u8>) -> Any {
    let mut any = Any::new();
    any.type_url = type_url.to_string();
    any.value = json;
    any
}

/// Type URL of a free-form JSON object payload (`keelctl events publish`).
pub const STRUCT_TYPE_URL: &str = "google.protobuf.Struct";

/// The descriptor of an event payload type keel can decode: containerd's event types
/// (task, container, content, image, namespace, snapshot), keel's own event messages
/// and `google.protobuf.Struct`.
pub fn event_type(type_url: &str) -> Option<protobuf::reflect::MessageDescriptor> {
    use containerd_shim_protos::events as e;
    let name = type_url.rsplit('/').next()?;
    let files = [
        e::task::file_descriptor(),
        e::container::file_descriptor(),
        e::content::file_descriptor(),
        e::image::file_descriptor(),
        e::namespace::file_descriptor(),
        e::snapshot::file_descriptor(),
        crate::api::events::file_descriptor(),
        protobuf::well_known_types::struct_::file_descriptor(),
    ];
    // protobuf wants the dotted full name (it panics on any other form).
    let dotted = format!(".{}", name.trim_start_matches('.'));
    files.iter().find_map(|f| f.message_by_full_name(&dotted))
}

/// Decodes an event payload of a type [`event_type`] knows; `None` for other types.
pub fn decode_event(any: &Any) -> Option<Box<dyn protobuf::MessageDyn>> {
    event_type(&any.type_url)?.parse_from_bytes(&any.value).ok()
}

/// Builds an event payload of type `type_name` from its JSON form (protobuf's JSON
/// mapping: `{"containerId": "x"}` for containerd types, any object for Struct).
pub fn event_from_json(type_name: &str, json: &str) -> Result<Any, Error> {
    let md = event_type(type_name)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown event type {type_name:?}")))?;
    let msg = protobuf_json_mapping::parse_dyn_from_str(&md, json)
        .map_err(|e| Error::InvalidArgument(format!("payload is not a valid {type_name}: {e}")))?;
    let mut any = Any::new();
    any.type_url = md.full_name().to_string();
    any.value = msg
        .write_to_bytes_dyn()
        .map_err(|e| Error::Internal(format!("encode: {e}")))?;
    Ok(any)
}

/// An event payload decoded once, so that several filter selectors can read its
/// fields without decoding it again each time.
pub enum DecodedEvent {
    /// A `google.protobuf.Struct` (`keelctl events publish`).
    Struct(protobuf::well_known_types::struct_::Struct),
    /// One of the types [`event_type`] knows.
    Message(Box<dyn protobuf::MessageDyn>),
    /// A type keel cannot decode, or bytes that do not decode: it has no fields.
    Opaque,
}

impl std::fmt::Debug for DecodedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodedEvent::Struct(_) => f.write_str("Struct"),
            DecodedEvent::Message(m) => write!(f, "{}", m.descriptor_dyn().full_name()),
            DecodedEvent::Opaque => f.write_str("Opaque"),
        }
    }
}

impl DecodedEvent {
    pub fn decode(any: &Any) -> Self {
        if any.type_url.rsplit('/').next() == Some(STRUCT_TYPE_URL) {
            return protobuf::well_known_types::struct_::Struct::parse_from_bytes(&any.value)
                .map_or(DecodedEvent::Opaque, DecodedEvent::Struct);
        }
        decode_event(any).map_or(DecodedEvent::Opaque, DecodedEvent::Message)
    }

    /// One field, as text (`container_id`, `exit_status`…; a top-level key of a
    /// Struct).
    pub fn field(&self, field: &str) -> Option<String> {
        use protobuf::well_known_types::struct_::value::Kind;
        match self {
            DecodedEvent::Struct(s) => match s.fields.get(field)?.kind.as_ref()? {
                Kind::StringValue(v) => Some(v.clone()),
                Kind::NumberValue(n) => Some(n.to_string()),
                Kind::BoolValue(b) => Some(b.to_string()),
                Kind::NullValue(_) => Some("null".into()),
                _ => None,
            },
            DecodedEvent::Message(msg) => {
                let fd = msg.descriptor_dyn().field_by_name(field)?;
                if fd.is_repeated() || fd.is_map() {
                    return None;
                }
                fd.get_singular(&**msg).map(|v| match v {
                    protobuf::reflect::ReflectValueRef::String(s) => s.to_string(),
                    other => other.to_string(),
                })
            }
            DecodedEvent::Opaque => None,
        }
    }
}

/// One field of a decoded event payload, as text (`container_id`, `exit_status`…;
/// a top-level key of a Struct payload).
pub fn event_field(any: &Any, field: &str) -> Option<String> {
    DecodedEvent::decode(any).field(field)
}

/// An event payload as JSON: containerd's JSON mapping for its own types, otherwise
/// the type URL and the payload's size.
pub fn event_json(any: &Any) -> String {
    decode_event(any)
        .and_then(|m| protobuf_json_mapping::print_to_string(&*m).ok())
        .unwrap_or_else(|| {
            format!(
                "{{\"@type\":{:?},\"bytes\":{}}}",
                any.type_url,
                any.value.len()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::events::task::TaskExit;

    #[test]
    fn times_render_as_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn timestamps_round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(system_time(&timestamp(t)), t);
    }

    #[test]
    fn any_uses_containerd_type_urls() {
        let mut exit = TaskExit::new();
        exit.container_id = "web".into();
        exit.id = "web".into();
        exit.pid = 42;
        exit.exit_status = 137;
        let any = pack(&exit).unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        let back: TaskExit = unpack(&any).unwrap();
        assert_eq!(back, exit);

        let mut prefixed = any.clone();
        prefixed.type_url = format!("type.googleapis.com/{}", any.type_url);
        assert_eq!(unpack::<TaskExit>(&prefixed).unwrap(), exit);

        assert_eq!(event_field(&any, "container_id").as_deref(), Some("web"));
        assert_eq!(event_field(&any, "exit_status").as_deref(), Some("137"));
        assert_eq!(event_field(&any, "nope"), None);
        // Every containerd event file is searched, whatever its package position.
        let create = containerd_shim_protos::events::container::ContainerCreate {
            id: "c".into(),
            ..Default::default()
        };
        assert_eq!(
            event_field(&pack(&create).unwrap(), "id").as_deref(),
            Some("c")
        );
        let unknown = json_any("example.Unknown", vec![1, 2]);
        assert!(decode_event(&unknown).is_none());
        assert!(event_json(&unknown).contains("example.Unknown"));
        let json = event_json(&any);
        assert!(
            json.contains("\"containerId\": \"web\"") || json.contains("\"containerId\":\"web\""),
            "{json}"
        );

        let s = event_from_json(STRUCT_TYPE_URL, r#"{"n": 3, "who": "x"}"#).unwrap();
        assert_eq!(event_field(&s, "n").as_deref(), Some("3"));
        assert_eq!(event_field(&s, "who").as_deref(), Some("x"));
        let e = event_from_json("containerd.events.TaskExit", r#"{"containerId": "c"}"#).unwrap();
        assert_eq!(event_field(&e, "container_id").as_deref(), Some("c"));
        assert!(matches!(
            event_from_json("nope.Type", "{}"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            event_from_json(STRUCT_TYPE_URL, "[1"),
            Err(Error::InvalidArgument(_))
        ));

        let mut wrong = any;
        wrong.type_url = "containerd.events.TaskStart".into();
        assert!(matches!(
            unpack::<TaskExit>(&wrong),
            Err(Error::InvalidArgument(_))
        ));
    }
}

//! Writes the seed inputs of every fuzz target under `fuzz/corpus/<target>/seed-*`:
//! one well-formed input of each kind, for the fuzzer to start from.
//!
//! usage: cargo run -p keel-fuzz --example seeds

use std::collections::HashMap;

use keel_fuzz::limits;
use keel_protocol::api::{containers, content, events, tasks};
use protobuf::Message;

fn main() {
    use keel_protocol::types::{
        json_any, pack, PROCESS_TYPE_URL, RESOURCES_TYPE_URL, SPEC_TYPE_URL,
    };
    use protobuf::MessageField;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, data: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    let request = |kind: u8, m: &dyn protobuf::MessageDyn| {
        let mut v = vec![kind];
        v.extend(m.write_to_bytes_dyn().unwrap());
        v
    };
    let labels = HashMap::from([("app".to_string(), "web".to_string())]);
    let spec = json_any(
        SPEC_TYPE_URL,
        br#"{"ociVersion":"1.0.2","process":{"args":["/bin/sh"],"cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#.to_vec(),
    );
    let mount = keel_protocol::api::types::Mount {
        type_: "bind".into(),
        source: "/srv/rootfs".into(),
        options: vec!["rbind".into(), "ro".into()],
        ..Default::default()
    };
    let container = containers::Container {
        id: "web".into(),
        labels: labels.clone(),
        spec: MessageField::some(spec.clone()),
        rootfs: vec![mount.clone()],
        runtime: MessageField::some(containers::container::Runtime {
            name: "io.containerd.runc.v2".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    write(
        "requests",
        "create-container",
        &request(
            0,
            &containers::CreateContainerRequest {
                container: MessageField::some(container.clone()),
                ..Default::default()
            },
        ),
    );
    write(
        "requests",
        "update-container",
        &request(
            1,
            &containers::UpdateContainerRequest {
                container: MessageField::some(container),
                ..Default::default()
            },
        ),
    );
    let digest = format!("sha256:{}", "ab".repeat(32));
    write(
        "requests",
        "create-task",
        &request(
            2,
            &tasks::CreateTaskRequest {
                container_id: "web".into(),
                stdout: "/run/fifo/out".into(),
                rootfs: vec![mount],
                checkpoint: MessageField::some(keel_protocol::api::types::Descriptor {
                    digest: digest.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    );
    let exec = |json: &[u8]| tasks::ExecProcessRequest {
        container_id: "web".into(),
        exec_id: "e1".into(),
        spec: MessageField::some(json_any(PROCESS_TYPE_URL, json.to_vec())),
        ..Default::default()
    };
    write(
        "requests",
        "exec",
        &request(
            3,
            &exec(br#"{"args":["ls","-l"],"cwd":"/","user":{"uid":0,"gid":0},"env":["A=b"]}"#),
        ),
    );
    // The shape that once aborted keeld: valid JSON, an array.
    write(
        "requests",
        "exec-array",
        &request(3, &exec(br#"[["sh"],{"uid":0,"gid":0},"/"]"#)),
    );
    write(
        "requests",
        "update-task",
        &request(
            4,
            &tasks::UpdateTaskRequest {
                container_id: "web".into(),
                resources: MessageField::some(json_any(
                    RESOURCES_TYPE_URL,
                    br#"{"memory":{"limit":1048576},"pids":{"limit":10}}"#.to_vec(),
                )),
                annotations: labels.clone(),
                ..Default::default()
            },
        ),
    );
    let exit = keel_protocol::containerd::events::task::TaskExit {
        container_id: "web".into(),
        id: "web".into(),
        pid: 42,
        exit_status: 137,
        ..Default::default()
    };
    let exit_any = pack(&exit).unwrap();
    let struct_any =
        keel_protocol::types::event_from_json("google.protobuf.Struct", r#"{"i": 1, "s": "x"}"#)
            .unwrap();
    write(
        "requests",
        "publish",
        &request(
            5,
            &events::PublishRequest {
                topic: "/app/x".into(),
                event: MessageField::some(struct_any.clone()),
                ..Default::default()
            },
        ),
    );
    write(
        "requests",
        "forward",
        &request(
            6,
            &events::ForwardRequest {
                envelope: MessageField::some(events::Envelope {
                    namespace: "default".into(),
                    topic: "/app/y".into(),
                    event: MessageField::some(struct_any.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    );
    write(
        "requests",
        "shim-forward",
        &request(
            7,
            &keel_protocol::containerd::api::ForwardRequest {
                envelope: MessageField::some(keel_protocol::containerd::shim::event::Envelope {
                    namespace: "default".into(),
                    topic: "/tasks/exit".into(),
                    event: MessageField::some(exit_any.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    );
    write(
        "requests",
        "subscribe",
        &request(
            8,
            &events::SubscribeRequest {
                filters: vec![
                    "topic~=^/tasks/.+,namespace==default".into(),
                    "event.container_id==web".into(),
                ],
                since: Some(3),
                ..Default::default()
            },
        ),
    );
    write(
        "requests",
        "write-content",
        &request(
            9,
            &content::WriteContentRequest {
                ref_: "my/ref".into(),
                data: b"abc".to_vec(),
                expected: digest.clone(),
                labels: labels.clone(),
                ..Default::default()
            },
        ),
    );
    write(
        "requests",
        "update-content",
        &request(
            10,
            &content::UpdateRequest {
                info: MessageField::some(content::Info {
                    digest: digest.clone(),
                    labels,
                    ..Default::default()
                }),
                ..Default::default()
            },
        ),
    );

    write(
        "filters",
        "plain",
        b"topic==\"/tasks/exit\"\nnamespace!=x,labels.app",
    );
    write(
        "filters",
        "regex",
        b"topic~=^/tasks/.+,namespace==bb\ntopic~=|^/tasks/ex|",
    );
    write(
        "filters",
        "quoted",
        br#"labels."very complex label"==something,name=="a\"b\x41\u00e9""#,
    );
    write(
        "filters",
        "payload",
        b"event.container_id==web,event.exit_status==137",
    );

    for (name, s) in [
        ("id", "foo-bar_baz.1"),
        ("ref", "my/ref.1"),
        ("digest", digest.as_str()),
        ("runtime", "io.containerd.runc.v2"),
        ("topic", "/tasks/exit"),
    ] {
        write("identifiers", name, s.as_bytes());
    }

    let blob = |media: &str| keel_protocol::checkpoint::Blob {
        media_type: media.into(),
        digest: digest.clone(),
        size: 10,
    };
    let cp = keel_protocol::checkpoint::Checkpoint {
        image: blob(keel_protocol::checkpoint::MEDIA_TYPE_CRIU_TAR),
        config: blob(keel_protocol::checkpoint::MEDIA_TYPE_CONFIG),
        options: Some(blob(keel_protocol::checkpoint::MEDIA_TYPE_RUNTIME_OPTIONS)),
        rw: None,
        runtime: "io.containerd.runc.v2".into(),
        container: "web".into(),
        rootfs: vec![keel_protocol::checkpoint::RootfsMount {
            kind: "bind".into(),
            source: "/srv/rootfs".into(),
            options: vec!["ro".into()],
        }],
        created: "2026-12-03T00:00:00Z".into(),
        criu_restore: vec!["tcp-established".into()],
    };
    let index = cp.to_index().unwrap();
    assert_eq!(
        keel_protocol::checkpoint::Checkpoint::parse(&digest, &index).unwrap(),
        cp
    );
    write("checkpoint_index", "index", &index);

    let image = image_tar();
    keel_actors::task::check_image_tar(&image[..], &limits()).expect("a valid image tar");
    write("checkpoint_tar", "image", &image);

    let mut seg = Vec::new();
    for (seq, any) in [(1u64, &exit_any), (2, &struct_any), (5, &exit_any)] {
        let env = events::Envelope {
            namespace: "default".into(),
            topic: "/tasks/exit".into(),
            event: MessageField::some(any.clone()),
            sequence: seq,
            ..Default::default()
        };
        let bytes = env.write_to_bytes().unwrap();
        seg.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_le_bytes());
        seg.extend_from_slice(&bytes);
    }
    let read = keel_storage::events::read_records(
        &seg[..],
        seg.len() as u64,
        0,
        &keel_actors::events::sequence_of,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!((read.records, read.torn), (3, false));
    write("event_log", "segment", &seg);

    let mut p = vec![0u8];
    p.extend(exit_any.value.clone());
    write("payloads", "task-exit", &p);
    let mut p = vec![8u8];
    p.extend(struct_any.value.clone());
    write("payloads", "struct", &p);
    write(
        "payloads",
        "struct-json",
        b"\x08{\"a\": [1, {\"b\": null}], \"c\": true}",
    );
    write(
        "payloads",
        "exit-json",
        b"\x00{\"containerId\": \"web\", \"exitStatus\": 3}",
    );
}

/// A small CRIU-like image tar: a directory and two files.
fn image_tar() -> Vec<u8> {
    let mut b = Vec::new();
    for (path, kind, data) in [
        ("sub/", b'5', &b""[..]),
        ("core-1.img", b'0', &b"core"[..]),
        ("sub/descriptors.json", b'0', &b"[]"[..]),
    ] {
        let mut h = [0u8; 512];
        h[..path.len()].copy_from_slice(path.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&c| u32::from(c)).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        b.extend_from_slice(&h);
        b.extend_from_slice(data);
        b.resize(b.len().div_ceil(512) * 512, 0);
    }
    b.resize(b.len() + 1024, 0);
    b
}

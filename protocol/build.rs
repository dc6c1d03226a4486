//! Generates keel's ttrpc API from `proto/keel/*.proto` with ttrpc-codegen's pure-Rust
//! parser (no protoc needed).

use std::{env, fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &[
    "proto/keel/types.proto",
    "proto/keel/version.proto",
    "proto/keel/containers.proto",
    "proto/keel/tasks.proto",
    "proto/keel/events.proto",
    "proto/keel/content.proto",
];

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("keel");
    fs::create_dir_all(&out).expect("create OUT_DIR/keel");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }

    Codegen::new()
        .inputs(PROTOS)
        .include("proto/keel")
        .rust_protobuf()
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .out_dir(&out)
        .run()
        .expect("generate keel protos");

    // Generated files open with inner attributes (`#![allow(..)]`), which `include!`
    // rejects; lib.rs sets the same allowances on the enclosing modules instead.
    for entry in fs::read_dir(&out).expect("read OUT_DIR/keel") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).expect("read generated file");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with("#!") && !l.starts_with("//!"))
                .collect();
            fs::write(&path, kept.join("\n")).expect("write generated file");
        }
    }
}

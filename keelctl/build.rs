//! Records the git revision keel was built from (`KEEL_GIT_REVISION`).

#[path = "../build-support/revision.rs"]
mod revision;

fn main() {
    revision::emit();
    println!("cargo:rerun-if-changed=../build-support/revision.rs");
}

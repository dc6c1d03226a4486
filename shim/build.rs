//! The shim is linked at a fixed address (not position-independent): a PIE's
//! relocations dirty its read-only-after-relocation data (vtables, tables of
//! pointers) in every process, half a megabyte of private memory per shim here;
//! at a fixed address those pages stay clean and shared between all shims.
fn main() {
    println!("cargo:rustc-link-arg-bins=-no-pie");
}

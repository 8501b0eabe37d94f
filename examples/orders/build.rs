//! The service's migrations are embedded at build time (`src/lib.rs`): a change to one of them
//! must rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

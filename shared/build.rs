//! The toolkit's migrations are embedded at build time (`refinery::embed_migrations!` in
//! `src/postgres/migrate.rs`): a change to one of them must rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=../migrations/outbox");
}

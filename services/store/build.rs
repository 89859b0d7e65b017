//! Build script of the store crate: `sqlx::migrate!` embeds the migration files at compile
//! time, so the crate is rebuilt when they change.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}

//! Filtered: every process receives every message except its own.
//!
//! Start it in several terminals (DATABASE_URL must be set):
//!
//! ```text
//! cargo run --example filtered -- --name alice
//! cargo run --example filtered -- --name bob --every-ms 500
//! ```
//!
//! Each publishes `{"from": NAME, "seq": n}` on a timer and prints what it
//! receives; Ctrl-C stops it cleanly. `cargo run --example demo` runs all four
//! scenarios by itself.

#[path = "scenario/mod.rs"]
mod scenario;

fn main() -> std::process::ExitCode {
    scenario::example_main(scenario::Mode::FILTERED)
}

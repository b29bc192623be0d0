//! Runnable examples; see `cargo run --example orders`.

//! Shared pieces of the runnable examples: the course's order saga, ported from .NET.
//!
//! See `cargo run --example order_saga` (all three services in one process) and
//! `cargo run --example orders`.

pub mod order_saga;

//! The conformance cases; each takes a [`Fixture`](crate::Fixture) and panics on failure.

mod ids;
mod messaging;
mod request;
mod support;

pub use ids::*;
pub use messaging::*;
pub use request::*;

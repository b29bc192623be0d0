//! The conformance cases; each takes a [`Fixture`](crate::Fixture) and panics on failure.

mod failures;
mod flow;
mod ids;
mod messaging;
mod request;
mod shutdown;
pub(crate) mod support;

pub use failures::*;
pub use flow::*;
pub use ids::*;
pub use messaging::*;
pub use request::*;
pub use shutdown::*;

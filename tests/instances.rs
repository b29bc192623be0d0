//! The messages of the many-instances tests: the `bus-worker` process and
//! `tests/tests/many_instances.rs` share them.

use bus_core::Message;
use serde::{Deserialize, Serialize};

/// A unit of work.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Instances:Work")]
pub struct Work {
    /// Its number.
    pub n: u32,
}

/// A request.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Instances:Quote")]
pub struct Quote {
    /// Its number.
    pub n: u32,
}

/// The answer, naming the process that gave it.
#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Instances:Quoted")]
pub struct Quoted {
    /// The request's number.
    pub n: u32,
    /// The answering process's id.
    pub process: u32,
}

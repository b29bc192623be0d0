//! bus-saga: state-machine sagas for bus-core.
//!
//! Not built yet: it arrives with its own issue (state machines, correlation, in-memory and
//! Redis repositories).

#![warn(clippy::print_stdout)]

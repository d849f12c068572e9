//! The operator's console and the event log over HTTP.

pub mod events;

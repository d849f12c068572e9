//! patchrelay: an update relay for antivirus, EDR and patch agents.
//!
//! Rooms, from the bottom up (a room uses only rooms below it):
//!
//! - [`digest`], [`config`]: shared vocabulary;
//! - [`store`]: bytes by SHA-256 on disk; [`upstream`]: the HTTP(S) client;
//! - [`repo`]: the repository format (manifest, signatures, publishing);
//! - [`fill`]: pulling an object through from upstream, once;
//! - [`http`]: the hot path (routes, ranges, conditionals);
//!   [`actors`]: the control plane (sync);
//! - [`server`]: wiring; [`cli`]: the command line.
//!
//! A request flows one way: `http` -> `store` (hit) or `fill` -> `upstream`
//! (miss), and the bytes flow back as a stream.

#![deny(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod actors;
pub mod agent;
pub mod airgap;
pub mod alerts;
pub mod cli;
pub mod config;
pub mod delta;
pub mod demo;
pub mod digest;
pub mod events;
pub mod fill;
pub mod fleet;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod limits;
pub mod repo;
pub mod server;
pub mod source;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;

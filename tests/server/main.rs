//! End-to-end tests of `wanserve serve`: the real binary on a free loopback port, the bundled
//! tiny model, the real plugins, real HTTP. One test binary (each binary links wasmtime, ort and
//! ffmpeg), one module per area.

#[path = "../common.rs"]
mod common;

mod abuse;
mod admin;
mod api;
mod client;
mod events;
mod faults;
mod fleet;
mod harness;
mod hostile;
mod jobs;
mod models;
mod playground;
mod s3;
mod schema;
mod webhooks;

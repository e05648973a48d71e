//! wanserve: text-to-video with Wan2.1 over ONNX Runtime. See ARCHITECTURE.md for the map.

pub mod backend;
pub mod client;
pub mod engine;
pub mod error_chain;
pub mod home;
pub mod ids;
#[cfg(test)]
mod import_graph;
pub mod jobs;
pub mod model;
pub mod peak_memory;
pub mod pipeline;
pub mod plugins;
mod private_file;
pub mod server;
pub mod storage;
pub mod sync;
pub mod tensor;
pub mod video;
pub mod wire;

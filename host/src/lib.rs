//! wanserve: text-to-video with Wan2.1 over ONNX Runtime. See ARCHITECTURE.md for the map.

pub mod backend;
pub mod client;
pub mod home;
pub mod jobs;
pub mod model;
pub mod peak_memory;
pub mod pipeline;
pub mod plugins;
mod private_file;
pub mod server;
pub mod storage;
pub mod tensor;
pub mod video;

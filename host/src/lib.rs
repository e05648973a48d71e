//! wanserve: text-to-video with Wan2.1 over ONNX Runtime. See ARCHITECTURE.md for the map.

pub mod backend;
pub mod model;
pub mod pipeline;
pub mod plugins;
pub mod video;

//! Frames → H.264 mp4 (libx264, yuv420p, faststart) through ffmpeg's libraries.

mod encoder;

pub use encoder::{EncodeError, EncoderSettings, Mp4Writer};

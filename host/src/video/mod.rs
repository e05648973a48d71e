//! Frames → H.264 mp4 (libx264, yuv420p, faststart) through ffmpeg's libraries.
//!
//! [`VideoEncoder`] is what a job's renderer writes frames through: [`H264`] in the server and
//! `wanserve generate`, a plain writer in tests that run the job workers without ffmpeg.

mod encoder;

pub use encoder::{EncodeError, EncoderSettings, Mp4Writer};

use std::path::{Path, PathBuf};

/// An open video being written: frames in, a finished file out.
pub trait FrameWriter {
    /// Appends `count` packed RGB24 frames.
    fn write_rgb(&mut self, rgb: &[u8], count: usize) -> Result<(), EncodeError>;
    /// Completes the file under its final name (until then it is not there).
    fn finish(self: Box<Self>) -> Result<PathBuf, EncodeError>;
}

/// Opens videos of one format.
pub trait VideoEncoder: Send + Sync {
    fn create(
        &self,
        target: &Path,
        width: usize,
        height: usize,
        fps: u32,
    ) -> Result<Box<dyn FrameWriter>, EncodeError>;
}

/// H.264 in mp4 at the given quality ([`EncoderSettings`]; its `fps` is the model's).
#[derive(Debug, Clone, Default)]
pub struct H264(pub EncoderSettings);

impl VideoEncoder for H264 {
    fn create(
        &self,
        target: &Path,
        width: usize,
        height: usize,
        fps: u32,
    ) -> Result<Box<dyn FrameWriter>, EncodeError> {
        let settings = EncoderSettings {
            fps,
            ..self.0.clone()
        };
        Ok(Box::new(Mp4Writer::create(
            target, width, height, &settings,
        )?))
    }
}

impl FrameWriter for Mp4Writer {
    fn write_rgb(&mut self, rgb: &[u8], count: usize) -> Result<(), EncodeError> {
        Mp4Writer::write_rgb(self, rgb, count)
    }

    fn finish(self: Box<Self>) -> Result<PathBuf, EncodeError> {
        Mp4Writer::finish(*self)
    }
}

//! wanserve's H.264 writer on raw frames from a file, for `scripts/bench-ratios` to time
//! against the ffmpeg CLI on the very same frames and settings (libx264, preset medium, CRF 18,
//! 2 threads, yuv420p, faststart, 16 fps):
//!
//! ```sh
//! cargo run --release -p wanserve --example encode_raw -- 832 480 frames.rgb out.mp4
//! ```
//!
//! Prints the seconds the encode took (frames fed four at a time, as the pipeline's chunked
//! decode feeds them).

use std::path::Path;
use std::time::Instant;
use wanserve::video::{EncoderSettings, Mp4Writer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [width, height, frames_file, output] = args.as_slice() else {
        return Err("usage: encode_raw WIDTH HEIGHT FRAMES.rgb OUT.mp4".into());
    };
    let (width, height): (usize, usize) = (width.parse()?, height.parse()?);
    let rgb = std::fs::read(frames_file)?;
    let frame_bytes = width * height * 3;
    if frame_bytes == 0 || rgb.len() % frame_bytes != 0 {
        return Err(format!("{frames_file} is not whole {width}x{height} RGB24 frames").into());
    }
    let started = Instant::now();
    let mut writer = Mp4Writer::create(
        Path::new(output),
        width,
        height,
        &EncoderSettings::default(),
    )?;
    for chunk in rgb.chunks(frame_bytes * 4) {
        writer.write_rgb(chunk, chunk.len() / frame_bytes)?;
    }
    writer.finish()?;
    println!("{:.4}", started.elapsed().as_secs_f64());
    Ok(())
}

use ffmpeg::{
    Dictionary, Packet, Rational, codec, encoder, format, frame, software::scaling,
    util::format::Pixel,
};
use ffmpeg_next as ffmpeg;
use std::path::{Path, PathBuf};
use std::sync::Once;

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("ffmpeg: {context}: {source}")]
    Ffmpeg {
        context: &'static str,
        source: ffmpeg::Error,
    },
    #[error("this ffmpeg build has no H.264 encoder (libx264)")]
    NoH264,
    #[error("frame size {width}x{height} must be even and positive for yuv420p")]
    BadSize { width: usize, height: usize },
    #[error("got {got} bytes for {count} frames of {width}x{height} RGB")]
    BadFrameData {
        got: usize,
        count: usize,
        width: usize,
        height: usize,
    },
    #[error("cannot move {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

fn ff(context: &'static str) -> impl FnOnce(ffmpeg::Error) -> EncodeError {
    move |source| EncodeError::Ffmpeg { context, source }
}

#[derive(Debug, Clone)]
pub struct EncoderSettings {
    pub fps: u32,
    /// x264 constant rate factor (lower is better quality, bigger files).
    pub crf: u8,
    pub preset: &'static str,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self {
            fps: 16,
            crf: 18,
            preset: "medium",
        }
    }
}

static INIT: Once = Once::new();

/// The `x264-params` the encoder opens with. Where the CPU has AVX-512, x264 is held to its AVX2
/// code: its AVX-512 code (with macroblock-tree rate control and B-frames, as every preset from
/// `veryfast` up uses) makes the stream depend on what uninitialised memory held. The same
/// frames encoded again in one process gave a different stream each time, and glibc's
/// `MALLOC_PERTURB_` alone changed the ffmpeg CLI's output; with `asm=AVX2` neither does, at
/// the same speed (issue 23, docs/RELIABILITY.md). Elsewhere x264 picks its own code.
fn x264_params(avx512: bool) -> String {
    let mut params = String::from("sliced-threads=1");
    if avx512 {
        params.push_str(":asm=AVX2");
    }
    params
}

/// Whether x264 would run its AVX-512 code here: the five extensions it requires. A CPU that
/// has them has everything x264's `AVX2` level names (AVX2, FMA3, BMI1/2, LZCNT); that is
/// checked too, so that x264 is never told of an instruction the CPU lacks.
fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx512 = has!("avx512f")
            && has!("avx512cd")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl");
        let avx2_level =
            has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("lzcnt");
        avx512 && avx2_level
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Streams RGB frames into an mp4. Writes to `<output>.partial` and renames only in
/// [`Mp4Writer::finish`]; dropping an unfinished writer deletes the partial file, so a failed or
/// cancelled job never leaves a truncated video under the final name.
pub struct Mp4Writer {
    output: format::context::Output,
    encoder: encoder::Video,
    scaler: scaling::Context,
    rgb: frame::Video,
    yuv: frame::Video,
    width: usize,
    height: usize,
    next_pts: i64,
    time_base: Rational,
    stream_time_base: Rational,
    partial: PathBuf,
    target: PathBuf,
    finished: bool,
}

impl Mp4Writer {
    pub fn create(
        target: &Path,
        width: usize,
        height: usize,
        settings: &EncoderSettings,
    ) -> Result<Self, EncodeError> {
        if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            return Err(EncodeError::BadSize { width, height });
        }
        INIT.call_once(|| {
            // Errors only: the library's informational lines are noise in a server log.
            ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Error);
        });
        ffmpeg::init().map_err(ff("init"))?;
        let mut partial = target.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let mut output = format::output_as(&partial, "mp4").map_err(ff("open output"))?;
        let codec = encoder::find_by_name("libx264").ok_or(EncodeError::NoH264)?;
        let global_header = output
            .format()
            .flags()
            .contains(format::Flags::GLOBAL_HEADER);
        let time_base = Rational::new(1, settings.fps as i32);

        let mut video = codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(ff("encoder"))?;
        video.set_width(width as u32);
        video.set_height(height as u32);
        video.set_format(Pixel::YUV420P);
        video.set_time_base(time_base);
        video.set_frame_rate(Some(Rational::new(settings.fps as i32, 1)));
        if global_header {
            video.set_flags(codec::Flags::GLOBAL_HEADER);
        }
        let mut options = Dictionary::new();
        options.set("preset", settings.preset);
        options.set("crf", &settings.crf.to_string());
        // Same frames, same bytes: x264's frame threads let a B-frame's QP depend on timing (it
        // reads its references' average QP, which is the planned value while a reference is
        // still encoding on the other thread and the measured one once it ended). Sliced threads
        // encode one frame at a time in a fixed number of slices. And see `x264_params`.
        options.set("threads", "2");
        options.set("x264-params", &x264_params(cpu_has_avx512()));
        let encoder = video
            .open_as_with(codec, options)
            .map_err(ff("open H.264 encoder"))?;

        let mut stream = output.add_stream(codec).map_err(ff("add stream"))?;
        stream.set_time_base(time_base);
        stream.set_parameters(&encoder);
        let mut muxer_options = Dictionary::new();
        muxer_options.set("movflags", "+faststart");
        // No encoder version strings or timestamps in the file: same frames, same bytes.
        muxer_options.set("fflags", "+bitexact");
        output
            .write_header_with(muxer_options)
            .map_err(ff("write header"))?;
        let stream_time_base = output.stream(0).map(|s| s.time_base()).unwrap_or(time_base);

        let scaler = scaling::Context::get(
            Pixel::RGB24,
            width as u32,
            height as u32,
            Pixel::YUV420P,
            width as u32,
            height as u32,
            scaling::Flags::BICUBIC | scaling::Flags::ACCURATE_RND | scaling::Flags::FULL_CHR_H_INT,
        )
        .map_err(ff("colour converter"))?;
        Ok(Self {
            output,
            encoder,
            scaler,
            rgb: frame::Video::new(Pixel::RGB24, width as u32, height as u32),
            yuv: frame::Video::new(Pixel::YUV420P, width as u32, height as u32),
            width,
            height,
            next_pts: 0,
            time_base,
            stream_time_base,
            partial,
            target: target.to_path_buf(),
            finished: false,
        })
    }

    /// Appends `count` packed RGB24 frames.
    pub fn write_rgb(&mut self, rgb: &[u8], count: usize) -> Result<(), EncodeError> {
        let row = self.width * 3;
        let frame_bytes = row * self.height;
        if rgb.len() != frame_bytes * count {
            return Err(EncodeError::BadFrameData {
                got: rgb.len(),
                count,
                width: self.width,
                height: self.height,
            });
        }
        for frame_data in rgb.chunks_exact(frame_bytes) {
            let stride = self.rgb.stride(0);
            let plane = self.rgb.data_mut(0);
            for (y, src) in frame_data.chunks_exact(row).enumerate() {
                plane[y * stride..y * stride + row].copy_from_slice(src);
            }
            self.scaler
                .run(&self.rgb, &mut self.yuv)
                .map_err(ff("colour conversion"))?;
            self.yuv.set_pts(Some(self.next_pts));
            self.next_pts += 1;
            self.encoder.send_frame(&self.yuv).map_err(ff("encode"))?;
            self.drain()?;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), EncodeError> {
        let mut packet = Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            // libx264 leaves durations unset; without them the muxer guesses the last sample's
            // and its edit list can cut the final frame.
            packet.set_duration(1);
            packet.rescale_ts(self.time_base, self.stream_time_base);
            packet
                .write_interleaved(&mut self.output)
                .map_err(ff("write packet"))?;
        }
        Ok(())
    }

    /// Flushes the encoder, writes the trailer (moving the index to the front) and renames the
    /// file to its final name.
    pub fn finish(mut self) -> Result<PathBuf, EncodeError> {
        self.encoder.send_eof().map_err(ff("flush encoder"))?;
        self.drain()?;
        self.output.write_trailer().map_err(ff("write trailer"))?;
        std::fs::rename(&self.partial, &self.target).map_err(|source| EncodeError::Rename {
            from: self.partial.clone(),
            to: self.target.clone(),
            source,
        })?;
        self.finished = true;
        Ok(self.target.clone())
    }
}

impl Drop for Mp4Writer {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoder settings that make the bytes independent of thread timing are in force: x264
    /// writes its settings into the stream (an SEI message), and it must say two sliced threads,
    /// not frame threads (whose B-frame QP depends on which thread finishes first).
    #[test]
    fn x264_runs_sliced_threads_so_timing_cannot_change_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        // Big enough that x264 keeps both threads (it drops to one for a frame of few rows).
        let (width, height, count) = (320, 192, 9);
        let rgb: Vec<u8> = (0..width * height * 3 * count)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut writer = Mp4Writer::create(
            &dir.path().join("v.mp4"),
            width,
            height,
            &EncoderSettings::default(),
        )
        .unwrap();
        writer.write_rgb(&rgb, count).unwrap();
        let bytes = std::fs::read(writer.finish().unwrap()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let settings = text
            .split_once("x264 - core")
            .map(|(_, rest)| rest.split('\0').next().unwrap_or(""))
            .expect("x264 writes its settings into the stream");
        let has = |option: &str| settings.split(' ').any(|word| word == option);
        assert!(has("threads=2"), "{settings}");
        assert!(has("sliced_threads=1"), "{settings}");
        assert!(!has("sliced_threads=0"), "{settings}");
    }
}

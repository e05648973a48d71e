//! Live previews: every few denoising steps the current estimate of the clean latents (x0)
//! becomes a small RGB picture without the VAE, as latent previewers make them: each latent
//! pixel's channels through the manifest's linear map (`preview.rgb_factors`, `rgb_bias`), so the
//! picture has the latents' size (1/8 of the video's: 104×60 for 832×480). Its frame is the
//! middle latent frame, the one most of the video is like. PNG-encoded for the wire.

use crate::model::PreviewSpec;
use ndarray::{ArrayView5, Axis};
use std::num::NonZeroUsize;

/// A preview of a job after `step` of `total` denoising steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub step: usize,
    pub total: usize,
    pub width: usize,
    pub height: usize,
    /// 8-bit RGB PNG, `width × height`.
    pub png: Vec<u8>,
}

/// Makes previews for a model whose manifest has a `preview` section.
#[derive(Debug, Clone)]
pub struct LatentPreviewer {
    factors: Vec<[f32; 3]>,
    bias: [f32; 3],
    every: NonZeroUsize,
}

impl LatentPreviewer {
    /// Previews after every `every`-th step and after the last.
    pub fn new(spec: &PreviewSpec, every: NonZeroUsize) -> Self {
        Self {
            factors: spec.rgb_factors.clone(),
            bias: spec.rgb_bias,
            every,
        }
    }

    /// Whether the step that makes `done` of `total` gets a preview.
    pub fn due(&self, done: usize, total: usize) -> bool {
        done > 0 && (done.is_multiple_of(self.every.get()) || done == total)
    }

    /// `[1, C, T, H, W]` normalised latents → the middle frame as packed RGB24 (`W × H`):
    /// `((bias + Σ_c x[c]·factors[c]) + 1) / 2`, clamped to [0, 1], × 255 rounded.
    pub fn rgb(&self, x0: ArrayView5<'_, f32>) -> (usize, usize, Vec<u8>) {
        let (frames, height, width) = (x0.shape()[2], x0.shape()[3], x0.shape()[4]);
        let frame = x0.index_axis(Axis(0), 0);
        let frame = frame.index_axis(Axis(1), frames / 2);
        let mut rgb = vec![0u8; width * height * 3];
        for y in 0..height {
            for x in 0..width {
                let mut pixel = self.bias;
                for (c, factors) in self.factors.iter().enumerate() {
                    let v = frame[[c, y, x]];
                    for (out, f) in pixel.iter_mut().zip(factors) {
                        *out += v * f;
                    }
                }
                let at = (y * width + x) * 3;
                for (k, v) in pixel.iter().enumerate() {
                    rgb[at + k] = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
        (width, height, rgb)
    }

    /// The preview of `x0` after `step` of `total`; `None` (logged) if it cannot be encoded.
    pub fn preview(&self, x0: ArrayView5<'_, f32>, step: usize, total: usize) -> Option<Preview> {
        let (width, height, rgb) = self.rgb(x0);
        match encode_png(width, height, &rgb) {
            Ok(png) => Some(Preview {
                step,
                total,
                width,
                height,
                png,
            }),
            // A preview is a courtesy: the job goes on without it.
            Err(e) => {
                tracing::warn!(error = %e, width, height, "cannot encode a preview");
                None
            }
        }
    }
}

fn encode_png(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>, png::EncodingError> {
    let mut out = Vec::with_capacity(rgb.len() / 2 + 128);
    let size = |v: usize| u32::try_from(v).map_err(|_| png::EncodingError::LimitsExceeded);
    let mut encoder = png::Encoder::new(&mut out, size(width)?, size(height)?);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array5;

    fn previewer(every: usize) -> LatentPreviewer {
        // Channel 0 drives red, channel 1 green; blue is the bias alone.
        let mut factors = vec![[0.0f32; 3]; 4];
        factors[0] = [1.0, 0.0, 0.0];
        factors[1] = [0.0, 0.5, 0.0];
        let spec = PreviewSpec {
            rgb_factors: factors,
            rgb_bias: [0.0, 0.0, -1.0],
            source: None,
        };
        LatentPreviewer::new(&spec, NonZeroUsize::new(every).expect("non-zero"))
    }

    #[test]
    fn the_map_is_applied_per_pixel_on_the_middle_frame() {
        // 3 latent frames; only the middle one carries a pattern.
        let mut x0 = Array5::<f32>::zeros((1, 4, 3, 2, 3));
        x0[[0, 0, 1, 0, 0]] = 1.0; // red 1 → 255
        x0[[0, 0, 1, 0, 1]] = -1.0; // red −1 → 0
        x0[[0, 1, 1, 1, 2]] = 2.0; // green 0.5·2 = 1 → 255
        x0[[0, 0, 0, 1, 1]] = 1.0; // first frame: ignored
        let (w, h, rgb) = previewer(1).rgb(x0.view());
        assert_eq!((w, h), (3, 2));
        let px = |x: usize, y: usize| &rgb[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(px(0, 0), [255, 128, 0]);
        assert_eq!(px(1, 0), [0, 128, 0]);
        assert_eq!(px(2, 1), [128, 255, 0]);
        assert_eq!(
            px(1, 1),
            [128, 128, 0],
            "the first frame's value does not show"
        );
    }

    #[test]
    fn previews_come_every_nth_step_and_after_the_last() {
        let p = previewer(3);
        let due: Vec<usize> = (0..=7).filter(|d| p.due(*d, 7)).collect();
        assert_eq!(due, [3, 6, 7]);
        assert!(
            previewer(5).due(3, 3),
            "a job shorter than the interval gets its last"
        );
    }

    #[test]
    fn a_preview_is_a_png_of_the_latent_size() {
        let x0 = Array5::<f32>::zeros((1, 4, 1, 5, 7));
        let preview = previewer(1).preview(x0.view(), 2, 4).expect("encodes");
        assert_eq!(&preview.png[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(&preview.png));
        let reader = decoder.read_info().expect("a PNG");
        let info = reader.info();
        assert_eq!((info.width, info.height), (7, 5));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!((preview.step, preview.total), (2, 4));
    }
}

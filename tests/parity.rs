//! wanserve against diffusers' `WanPipeline` on the bundled tiny model: the references in
//! `models/references/` were computed by `models/reference.py` (diffusers 0.42.1, fp32, CPU).
//! Tolerances: noise 1e-6 (torch's vectorised Box–Muller), final latents 1e-4, frames ±1/255.

mod common;

use ndarray::{Array3, Array4, Array5};
use ndarray_npy::read_npy;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::OnceLock;
use wanserve::backend::{Device, OrtBackend};
use wanserve::model::ModelDir;
use wanserve::pipeline::step_cache::CacheMode;
use wanserve::pipeline::step_cache::MagRatios;
use wanserve::pipeline::{CancelToken, GenerateRequest, Pipeline, skip_plan};

#[derive(Deserialize)]
struct Case {
    prompt: String,
    negative_prompt: String,
    width: usize,
    height: usize,
    num_frames: usize,
    infer_steps: usize,
    guidance_scale: f32,
    seed: u64,
    kept_frames: Vec<usize>,
    prompt_ids: Vec<i64>,
    negative_prompt_ids: Option<Vec<i64>>,
    /// Step-cached cases: the mode, the ratios diffusers was given, and what it skipped.
    #[serde(default)]
    cache: Option<CacheMode>,
    #[serde(default)]
    mag_ratios: Option<Vec<f64>>,
    #[serde(default)]
    skipped: Option<Skipped>,
}

#[derive(Deserialize)]
struct Skipped {
    cond: Vec<bool>,
    uncond: Vec<bool>,
}

fn load_pipeline() -> Pipeline<OrtBackend> {
    load_pipeline_of(&common::tiny_model())
}

fn load_pipeline_of(dir: &std::path::Path) -> Pipeline<OrtBackend> {
    let model = ModelDir::open(dir).expect("bundled model opens");
    let backend =
        OrtBackend::load(&model, Device::Cpu, 2).expect("ONNX Runtime loads the bundled model");
    Pipeline::new(backend, &model).expect("pipeline")
}

fn pipeline() -> &'static Pipeline<OrtBackend> {
    static PIPELINE: OnceLock<Pipeline<OrtBackend>> = OnceLock::new();
    PIPELINE.get_or_init(load_pipeline)
}

/// Guidance as one batch-2 DiT call per step.
fn batched_guidance_pipeline() -> &'static Pipeline<OrtBackend> {
    static PIPELINE: OnceLock<Pipeline<OrtBackend>> = OnceLock::new();
    PIPELINE.get_or_init(|| load_pipeline().with_batched_guidance(true))
}

fn case_dir(name: &str) -> PathBuf {
    common::repo_root()
        .join("models")
        .join("references")
        .join(name)
}

/// The largest difference between two arrays of the same length (a length mismatch is a
/// failure, not a shorter comparison).
fn max_abs_diff<'a>(
    a: impl IntoIterator<Item = &'a f32>,
    b: impl IntoIterator<Item = &'a f32>,
) -> f32 {
    let (a, b): (Vec<f32>, Vec<f32>) = (
        a.into_iter().copied().collect(),
        b.into_iter().copied().collect(),
    );
    assert_eq!(a.len(), b.len(), "arrays of different lengths");
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check_case(name: &str) {
    check_case_with(pipeline(), name)
}

fn check_case_with(pipeline: &Pipeline<OrtBackend>, name: &str) {
    let dir = case_dir(name);
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let request = GenerateRequest {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        width: case.width,
        height: case.height,
        num_frames: case.num_frames,
        infer_steps: case.infer_steps,
        guidance_scale: case.guidance_scale,
        seed: case.seed,
        cache: case.cache.unwrap_or_default(),
    };

    // Tokens, with diffusers' prompt cleaning.
    let tokens = pipeline.tokenize(&case.prompt).unwrap();
    assert_eq!(
        tokens.input_ids[..tokens.len],
        case.prompt_ids[..],
        "{name}: prompt tokens"
    );
    assert_eq!(tokens.input_ids.len(), 512);
    if let Some(negative_ids) = &case.negative_prompt_ids {
        let negative = pipeline.tokenize(&case.negative_prompt).unwrap();
        assert_eq!(
            negative.input_ids[..negative.len],
            negative_ids[..],
            "{name}: negative tokens"
        );
    }

    // Text embeddings, zero past the prompt.
    let expected_embeds: Array3<f32> = read_npy(dir.join("prompt_embeds.npy")).unwrap();
    let embeds = pipeline.encode_prompt(&case.prompt).unwrap();
    assert_eq!(embeds.shape(), expected_embeds.shape());
    let d_embeds = max_abs_diff(&embeds, &expected_embeds);
    assert!(
        d_embeds <= 1e-5,
        "{name}: prompt embeddings differ by {d_embeds}"
    );

    // Seeded noise.
    let plan = pipeline.plan(&request).unwrap();
    let expected_noise: Array5<f32> = read_npy(dir.join("noise.npy")).unwrap();
    let noise = pipeline.initial_noise(&plan, case.seed).unwrap();
    assert_eq!(
        noise.shape(),
        expected_noise.shape(),
        "{name}: latent shape"
    );
    let d_noise = max_abs_diff(&noise, &expected_noise);
    assert!(
        d_noise <= 1e-6,
        "{name}: noise differs from torch by {d_noise}"
    );

    // The whole run: final latents and decoded frames.
    let mut frames = Vec::new();
    let mut frame_size = (0, 0);
    let generated = pipeline
        .generate(
            &request,
            &CancelToken::default(),
            &mut |_| {},
            &mut |chunk| {
                frames.extend_from_slice(chunk.rgb);
                frame_size = (chunk.width, chunk.height);
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(generated.frames, case.num_frames, "{name}: frame count");
    assert_eq!(frame_size, (case.width, case.height), "{name}: frame size");
    let expected_latents: Array5<f32> = read_npy(dir.join("latents.npy")).unwrap();
    let d_latents = max_abs_diff(&generated.latents, &expected_latents);
    assert!(
        d_latents <= 1e-4,
        "{name}: final latents differ by {d_latents}"
    );

    let expected_frames: Array4<u8> = read_npy(dir.join("frames.npy")).unwrap();
    let frame_bytes = case.width * case.height * 3;
    assert_eq!(frames.len(), frame_bytes * case.num_frames);
    let mut worst = 0u8;
    for (k, &index) in case.kept_frames.iter().enumerate() {
        let ours = &frames[index * frame_bytes..(index + 1) * frame_bytes];
        let theirs = expected_frames.index_axis(ndarray::Axis(0), k);
        assert_eq!(ours.len(), theirs.len(), "{name}: frame {index}");
        for (a, b) in ours.iter().zip(theirs.iter()) {
            worst = worst.max(a.abs_diff(*b));
        }
    }
    assert!(worst <= 1, "{name}: frames differ by {worst}/255");
    eprintln!(
        "{name}: max |Δ| embeddings {d_embeds:.1e}, noise {d_noise:.1e}, latents {d_latents:.1e}, frames {worst}/255"
    );
}

/// The same diffusers reference, with the conditional and unconditional passes in one batch-2
/// call per step.
#[test]
fn negative_prompt_with_batched_guidance() {
    check_case_with(batched_guidance_pipeline(), "negative_prompt");
}

/// The second bundled model (other widths in every graph, its own tokenizer) against diffusers
/// on the same request: the export and the host follow the model's dimensions.
#[test]
fn wide_model_english_prompt_landscape() {
    let wide = load_pipeline_of(&common::repo_root().join("models").join("tiny-wide"));
    check_case_with(&wide, "wide_en_landscape");
}

#[test]
fn english_prompt_landscape() {
    check_case("en_landscape");
}

#[test]
fn cjk_prompt_portrait_with_frame_rounding() {
    check_case("cjk_portrait_rounded");
}

#[test]
fn emoji_prompt_without_guidance() {
    check_case("emoji_no_guidance");
}

#[test]
fn negative_prompt_and_largest_seed() {
    check_case("negative_prompt");
}

#[test]
fn prompt_longer_than_512_tokens_is_truncated() {
    check_case("long_prompt_truncated");
}

#[test]
fn html_entities_and_whitespace_single_frame() {
    check_case("html_whitespace_one_frame");
}

#[test]
fn twenty_steps() {
    check_case("twenty_steps");
}

#[test]
fn api_size_832x480_24_frames() {
    check_case("api_size_832x480");
}

/// A step-cached case: diffusers' `MagCacheConfig` was given one ratio array, which it applies to
/// both guidance branches; the bundled manifest's (per-branch) ratios are set to it.
fn check_cached_case(name: &str) {
    let dir = case_dir(name);
    let case: Case =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let ratios = case
        .mag_ratios
        .clone()
        .expect("a cached case has its ratios");
    let expected = case.skipped.as_ref().expect("a cached case has its skips");
    let mut model = ModelDir::open(&common::tiny_model()).expect("bundled model opens");
    let spec = model
        .manifest
        .step_cache
        .as_mut()
        .expect("the bundled model has step-cache ratios");
    spec.ratios = MagRatios {
        cond: ratios.clone(),
        uncond: ratios,
    };
    let backend = OrtBackend::load(&model, Device::Cpu, 2).expect("bundled model loads");
    let cached = Pipeline::new(backend, &model).expect("pipeline");
    let request = GenerateRequest {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        width: case.width,
        height: case.height,
        num_frames: case.num_frames,
        infer_steps: case.infer_steps,
        guidance_scale: case.guidance_scale,
        seed: case.seed,
        cache: case.cache.expect("a cached case has its mode"),
    };

    // The same passes skipped, branch by branch.
    let plan = skip_plan(cached.manifest(), &request).unwrap();
    assert_eq!(plan.cond, expected.cond, "{name}: conditional skips");
    assert_eq!(plan.uncond, expected.uncond, "{name}: unconditional skips");
    assert!(plan.skipped_passes() > 0, "{name}: the case skips nothing");

    check_case_with(&cached, name);

    // And the skips matter: without them the same request ends elsewhere.
    let full = GenerateRequest {
        cache: CacheMode::Off,
        ..request
    };
    let uncached = cached
        .generate(&full, &CancelToken::default(), &mut |_| {}, &mut |_| Ok(()))
        .unwrap();
    let expected_latents: Array5<f32> = read_npy(dir.join("latents.npy")).unwrap();
    let d_uncached = max_abs_diff(&uncached.latents, &expected_latents);
    assert!(
        d_uncached > 1e-3,
        "{name}: the uncached run is as close ({d_uncached}) as the cached one"
    );
}

#[test]
fn step_cache_fast_with_guidance_skips_what_diffusers_skips() {
    check_cached_case("magcache_fast");
}

#[test]
fn step_cache_faster_without_guidance_skips_what_diffusers_skips() {
    check_cached_case("magcache_faster_unguided");
}

/// wanserve's calibration run against diffusers' `MagCacheConfig(calibrate=True)`, which wrote
/// the bundled manifest's ratios (models/export.py: 128x64, 9 frames, 50 steps, guidance 5,
/// seed 0, this prompt).
#[test]
fn step_cache_calibration_measures_the_ratios_diffusers_measured() {
    let model = ModelDir::open(&common::tiny_model()).expect("bundled model opens");
    let diffusers = model
        .manifest
        .step_cache
        .clone()
        .expect("the bundled model has ratios")
        .ratios;
    let request = GenerateRequest {
        prompt: "A beautiful sunset over the mountains, golden light on the snow".into(),
        negative_prompt: String::new(),
        width: 128,
        height: 64,
        num_frames: 9,
        infer_steps: 50,
        guidance_scale: 5.0,
        seed: 0,
        cache: CacheMode::Off,
    };
    let ours = pipeline()
        .calibrate_step_cache(&request, &mut |_| {})
        .unwrap();
    for (branch, a, b) in [
        ("cond", &ours.cond, &diffusers.cond),
        ("uncond", &ours.uncond, &diffusers.uncond),
    ] {
        assert_eq!(a.len(), 50, "{branch}");
        assert_eq!(a.len(), b.len(), "{branch}");
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-4, "{branch}: ratios differ by {worst}");
        eprintln!("calibration {branch}: max |Δ| {worst:.1e}");
    }
}

#[derive(Deserialize)]
struct FewStepCase {
    prompt: String,
    width: usize,
    height: usize,
    num_frames: usize,
    infer_steps: usize,
    seed: u64,
}

/// The few-step (DMD) sampler on the tiny model with FastWan's settings against
/// `models/reference_dmd.py` (FastVideo's DMD loop with torch's generator, the same DiT graph):
/// the initial noise drawn frame-major, then the final latents after 3 steps (two of them
/// noised again with fresh draws from the same generator). A guidance scale is ignored.
#[test]
fn few_step_sampler_matches_fastvideos_dmd_loop() {
    let dir = case_dir("dmd_fastwan");
    let case: FewStepCase =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let temp = tempfile::tempdir().expect("temp dir");
    common::few_step_model_dir(temp.path(), "fastwan");
    let model = ModelDir::open(temp.path()).expect("the few-step model opens");
    let backend = OrtBackend::load(&model, Device::Cpu, 2).expect("ONNX Runtime loads it");
    let pipeline = Pipeline::new(backend, &model).expect("pipeline");
    let request = GenerateRequest {
        prompt: case.prompt.clone(),
        negative_prompt: String::new(),
        width: case.width,
        height: case.height,
        num_frames: case.num_frames,
        infer_steps: case.infer_steps,
        guidance_scale: 5.0,
        seed: case.seed,
        cache: CacheMode::Off,
    };
    // Each timestep's sigma, from the training-noise table as FastVideo looks it up.
    let sampler = wanserve::pipeline::few_step::FewStepSampler::new(
        model.manifest.sampler.as_ref().expect("a sampler"),
    );
    let sigmas: Vec<f32> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("sigmas.json")).unwrap()).unwrap();
    for (i, expected) in sigmas.iter().enumerate() {
        assert_eq!(sampler.sigma(i), *expected, "σ at step {i}");
    }
    let plan = pipeline.plan(&request).unwrap();
    let expected_noise: Array5<f32> = read_npy(dir.join("noise.npy")).unwrap();
    let noise = pipeline.initial_noise(&plan, case.seed).unwrap();
    assert_eq!(noise.shape(), expected_noise.shape());
    let d_noise = max_abs_diff(&noise, &expected_noise);
    assert!(d_noise <= 1e-6, "initial noise differs by {d_noise}");

    let generated = pipeline
        .generate(&request, &CancelToken::default(), &mut |_| {}, &mut |_| {
            Ok(())
        })
        .unwrap();
    let expected: Array5<f32> = read_npy(dir.join("latents.npy")).unwrap();
    assert_eq!(generated.latents.shape(), expected.shape());
    let d_latents = max_abs_diff(&generated.latents, &expected);
    eprintln!("few-step parity: noise within {d_noise:e}, final latents within {d_latents:e}");
    assert!(d_latents <= 1e-4, "final latents differ by {d_latents}");
    // Not the base sampler's answer: the same request there ends elsewhere.
    let base = pipeline_on_base_differs(&request, &generated.latents);
    assert!(
        base > 1e-2,
        "the base model's latents are the same ({base})"
    );

    // A distilled model runs its own step count only.
    let wrong = GenerateRequest {
        infer_steps: 4,
        ..request
    };
    let refused = pipeline
        .plan(&wrong)
        .expect_err("4 steps on a 3-step model");
    assert!(refused.to_string().contains("exactly 3 steps"), "{refused}");
}

/// The largest difference between `latents` and the bundled (base) model's for `request`.
fn pipeline_on_base_differs(request: &GenerateRequest, latents: &Array5<f32>) -> f32 {
    let base = pipeline()
        .generate(request, &CancelToken::default(), &mut |_| {}, &mut |_| {
            Ok(())
        })
        .unwrap();
    max_abs_diff(&base.latents, latents)
}

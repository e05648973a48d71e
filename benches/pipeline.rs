//! Hot paths of one generation, on the bundled tiny model at the API's 832x480 size:
//! a denoising step (two DiT calls with guidance + the scheduler, the same with one batch-2
//! call, and a step-cached step whose passes skip the blocks), the scheduler alone at the
//! real 480p/81-frame latent size, one VAE chunk, the seeded noise, and H.264 encoding of 81
//! frames; and two jobs at once against one after the other. `cargo bench -p wanserve --bench
//! pipeline`.

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ndarray::{Array5, s};
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;
use wanserve::backend::arithmetic::{DeviceTensor, OrtTensors};
use wanserve::backend::{Backend, Device, OrtBackend};
use wanserve::model::{ModelDir, bundled_model_dir};
use wanserve::pipeline::step_cache::CacheMode;
use wanserve::pipeline::unipc::UniPcScheduler;
use wanserve::pipeline::{CancelToken, GenerateRequest, Pipeline, noise};
use wanserve::tensor::TensorArithmetic;
use wanserve::video::{EncoderSettings, Mp4Writer};

const WIDTH: usize = 832;
const HEIGHT: usize = 480;

fn request(num_frames: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: "A beautiful sunset over the mountains".into(),
        negative_prompt: String::new(),
        width: WIDTH,
        height: HEIGHT,
        num_frames,
        infer_steps: 20,
        guidance_scale: 5.0,
        seed: 1,
        cache: CacheMode::Off,
    }
}

fn tiny_pipeline() -> Pipeline<OrtBackend> {
    let model = ModelDir::open(&bundled_model_dir()).expect("bundled model");
    let backend =
        OrtBackend::load(&model, Device::Cpu, 0).expect("ONNX Runtime (run scripts/setup)");
    Pipeline::new(backend, &model).expect("pipeline")
}

fn denoise_and_decode(c: &mut Criterion) {
    let pipeline = tiny_pipeline();
    let req = request(24);
    let plan = pipeline.plan(&req).unwrap();
    let latents = pipeline.initial_noise(&plan, 1).unwrap();
    let backend = pipeline.backend();
    let run = backend.run_control().unwrap();
    let context = backend
        .prepare_context(&pipeline.encode_prompt(&req.prompt).unwrap())
        .unwrap();
    let negative = backend
        .prepare_context(&pipeline.encode_prompt("").unwrap())
        .unwrap();
    let mut group = c.benchmark_group("tiny_832x480_24f");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    // One denoising step: the guided prediction `guide` gives, then the scheduler's update.
    let step = |b: &mut criterion::Bencher, guide: &dyn Fn(&DeviceTensor, i64) -> DeviceTensor| {
        b.iter_batched(
            || {
                let scheduler = UniPcScheduler::new(&pipeline.manifest().scheduler, 20).unwrap();
                (scheduler, backend.upload_latents(&latents).unwrap())
            },
            |(mut scheduler, x)| {
                let guided = guide(&x, scheduler.timesteps()[0]);
                black_box(
                    scheduler
                        .step_with(backend.arithmetic(), guided, x)
                        .unwrap(),
                )
            },
            BatchSize::PerIteration,
        )
    };
    group.bench_function("denoise_step_cfg", |b| {
        step(b, &|x, t| {
            let cond = backend.predict(x, t, &context, &run).unwrap();
            let uncond = backend.predict(x, t, &negative, &run).unwrap();
            backend
                .arithmetic()
                .weighted_sum(&[(-4.0, &uncond), (5.0, &cond)])
                .unwrap()
        })
    });
    // The same step with both guidance passes in one batch-2 call (`--batch-cfg`).
    let pair = backend
        .prepare_context_pair(
            &pipeline.encode_prompt(&req.prompt).unwrap(),
            &pipeline.encode_prompt("").unwrap(),
        )
        .unwrap();
    group.bench_function("denoise_step_cfg_batched", |b| {
        step(b, &|x, t| {
            backend.predict_guided(x, t, &pair, 5.0, &run).unwrap()
        })
    });
    // Step caching: a step that skips the blocks in both branches (embedding + kept residual +
    // head, then the same update) against the full step above.
    let cond_residual = backend
        .predict_keeping_residual(
            &backend.upload_latents(&latents).unwrap(),
            999,
            &context,
            &run,
        )
        .unwrap()
        .1;
    let uncond_residual = backend
        .predict_keeping_residual(
            &backend.upload_latents(&latents).unwrap(),
            999,
            &negative,
            &run,
        )
        .unwrap()
        .1;
    group.bench_function("denoise_step_cfg_cached", |b| {
        step(b, &|x, t| {
            let cond = backend
                .predict_skipping_blocks(x, t, &cond_residual, &run)
                .unwrap();
            let uncond = backend
                .predict_skipping_blocks(x, t, &uncond_residual, &run)
                .unwrap();
            backend
                .arithmetic()
                .weighted_sum(&[(-4.0, &uncond), (5.0, &cond)])
                .unwrap()
        })
    });
    // A steady-state chunk: first chunk once for its cache, then time the next chunk.
    let first: Array5<f32> = latents.slice(s![.., .., 0..1, .., ..]).to_owned();
    let second: Array5<f32> = latents.slice(s![.., .., 1..2, .., ..]).to_owned();
    group.bench_function("vae_decode_chunk", |b| {
        b.iter_batched(
            || backend.decode_first(first.view(), &run).unwrap().1,
            |cache| black_box(backend.decode_next(second.view(), cache, &run).unwrap()),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn scheduler_and_noise(c: &mut Criterion) {
    // Wan2.1 at 480x832, 81 frames: latents [1, 16, 21, 60, 104].
    let count = 16 * 21 * 60 * 104;
    let config = serde_json::from_value(serde_json::json!({
        "_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
        "use_flow_sigmas": true, "flow_shift": 3.0, "solver_order": 2}))
    .unwrap();
    let sample = noise::torch_randn(1, count).unwrap();
    let output = noise::torch_randn(2, count).unwrap();
    let mut group = c.benchmark_group("latents_480p_81f");
    group.sample_size(20);
    group.bench_function("unipc_step_order2", |b| {
        b.iter_batched(
            || {
                // Warm the multistep history so the timed step is a full predictor + corrector.
                let mut scheduler = UniPcScheduler::new(&config, 50).unwrap();
                let x = scheduler.step(output.clone(), sample.clone()).unwrap();
                (scheduler, x, output.clone())
            },
            |(mut scheduler, x, output)| black_box(scheduler.step(output, x).unwrap()),
            BatchSize::PerIteration,
        )
    });
    // The same step as the pipeline runs it: weighted sums by ONNX Runtime on tensors it holds
    // (here the CPU EP; on CUDA the tensors never leave the GPU).
    let arithmetic = OrtTensors::new(Device::Cpu, 5, 1);
    let shape = [1, 16, 21, 60, 104];
    group.bench_function("unipc_step_order2_ort_cpu", |b| {
        b.iter_batched(
            || {
                let mut scheduler = UniPcScheduler::new(&config, 50).unwrap();
                let upload = |v: &Vec<f32>| DeviceTensor::from_host(&shape, v.clone()).unwrap();
                let x = scheduler
                    .step_with(&arithmetic, upload(&output), upload(&sample))
                    .unwrap();
                (scheduler, x, upload(&output))
            },
            |(mut scheduler, x, output)| {
                black_box(scheduler.step_with(&arithmetic, output, x).unwrap())
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("torch_randn", |b| {
        b.iter(|| black_box(noise::torch_randn(1, count).unwrap()))
    });
    group.finish();
}

fn encode_81_frames(c: &mut Criterion) {
    // Smooth moving gradients plus texture: something between flat colour and pure noise.
    let frame_bytes = WIDTH * HEIGHT * 3;
    let mut rgb = vec![0u8; frame_bytes * 81];
    for (i, v) in rgb.iter_mut().enumerate() {
        let t = i / frame_bytes;
        let p = i % frame_bytes;
        let (x, y, ch) = ((p / 3) % WIDTH, (p / 3) / WIDTH, p % 3);
        *v = ((x + 2 * t) as u32 * (ch as u32 + 1) + y as u32 + ((x * 7 + y * 13) % 17) as u32)
            as u8;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.mp4");
    let mut group = c.benchmark_group("encode");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("h264_81f_832x480", |b| {
        b.iter(|| {
            let mut writer =
                Mp4Writer::create(Path::new(&out), WIDTH, HEIGHT, &EncoderSettings::default())
                    .unwrap();
            for chunk in rgb.chunks(frame_bytes * 4) {
                writer.write_rgb(chunk, chunk.len() / frame_bytes).unwrap();
            }
            black_box(writer.finish().unwrap())
        })
    });
    group.finish();
}

/// Two jobs on one pipeline (shared sessions, steps in turns), at once against one after the
/// other: what the second slot buys on this machine's cores.
fn two_jobs(c: &mut Criterion) {
    let pipeline = tiny_pipeline();
    let job = |seed| GenerateRequest {
        width: 416,
        height: 224,
        num_frames: 12,
        infer_steps: 8,
        seed,
        ..request(12)
    };
    let (a, b) = (job(1), job(2));
    let run = |req: &GenerateRequest| {
        pipeline
            .generate(req, &CancelToken::default(), &mut |_| {}, &mut |chunk| {
                black_box(chunk.rgb.len());
                Ok(())
            })
            .unwrap()
            .frames
    };
    let mut group = c.benchmark_group("two_jobs_416x224_12f_8steps");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    group.bench_function("one_after_the_other", |bench| {
        bench.iter(|| (run(&a), run(&b)))
    });
    group.bench_function("at_once", |bench| {
        bench.iter(|| {
            std::thread::scope(|s| {
                let first = s.spawn(|| run(&a));
                let second = run(&b);
                (first.join().unwrap(), second)
            })
        })
    });
    group.finish();
}

/// A whole 50-step job on the bundled model at 832x480, uncached against `cache: fast` and
/// `faster` (1 frame, so that the denoising dominates over decoding).
fn step_cache_50_steps(c: &mut Criterion) {
    let pipeline = tiny_pipeline();
    let job = |cache| GenerateRequest {
        width: 832,
        height: 480,
        num_frames: 1,
        infer_steps: 50,
        cache,
        ..request(1)
    };
    let run = |req: &GenerateRequest| {
        pipeline
            .generate(req, &CancelToken::default(), &mut |_| {}, &mut |_| Ok(()))
            .unwrap()
            .frames
    };
    let mut group = c.benchmark_group("tiny_832x480_50steps");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    for cache in [CacheMode::Off, CacheMode::Fast, CacheMode::Faster] {
        let req = job(cache);
        group.bench_function(format!("cache_{cache}"), |b| b.iter(|| run(&req)));
    }
    group.finish();
}

/// The bundled model made few-step by `models/few_step.py` (FastWan's settings), in `dir`.
fn few_step_copy(dir: &std::path::Path) -> Pipeline<OrtBackend> {
    let made = std::process::Command::new("python3")
        .arg(bundled_model_dir().join("../few_step.py"))
        .arg(bundled_model_dir())
        .arg("--out")
        .arg(dir)
        .args(["--preset", "fastwan"])
        .output()
        .expect("python3 runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let model = ModelDir::open(dir).expect("few-step model");
    let backend = OrtBackend::load(&model, Device::Cpu, 0).expect("ONNX Runtime");
    Pipeline::new(backend, &model).expect("pipeline")
}

/// A whole job at 832x480 (1 frame, so the denoising dominates): the base model's 50 guided
/// UniPC steps against a few-step distilled model's 3 unguided DMD steps, same weights.
fn few_step_against_base(c: &mut Criterion) {
    let base = tiny_pipeline();
    let dir = tempfile::tempdir().expect("temp dir");
    let few = few_step_copy(dir.path());
    let job = |steps| GenerateRequest {
        width: 832,
        height: 480,
        num_frames: 1,
        infer_steps: steps,
        ..request(1)
    };
    let run = |pipeline: &Pipeline<OrtBackend>, req: &GenerateRequest| {
        pipeline
            .generate(req, &CancelToken::default(), &mut |_| {}, &mut |_| Ok(()))
            .unwrap()
            .frames
    };
    let mut group = c.benchmark_group("tiny_832x480_job");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    let (base_job, few_job) = (job(50), job(3));
    group.bench_function("base_50_steps_guided", |b| b.iter(|| run(&base, &base_job)));
    group.bench_function("dmd_3_steps", |b| b.iter(|| run(&few, &few_job)));
    group.finish();
}

/// What live previews cost: one preview at real size (the host's part: the map and the PNG of
/// a [1, 16, 21, 60, 104] x0), and a whole 20-step job at 832x480 (1 frame) with a preview
/// after every step against none (their difference over 20 is the cost per preview step,
/// download of the latents included).
fn previews(c: &mut Criterion) {
    let model = ModelDir::open(&bundled_model_dir()).unwrap();
    let spec = model
        .manifest
        .preview
        .clone()
        .expect("the tiny model has preview factors");
    let previewer = wanserve::pipeline::preview::LatentPreviewer::new(&spec, NonZeroUsize::MIN);
    let x0 = Array5::from_shape_vec(
        (1, 16, 21, 60, 104),
        noise::torch_randn(3, 16 * 21 * 60 * 104).unwrap(),
    )
    .unwrap();
    let mut group = c.benchmark_group("previews");
    group.bench_function("preview_png_480p_81f", |b| {
        b.iter(|| black_box(previewer.preview(x0.view(), 1, 50).unwrap().png.len()))
    });
    let job = GenerateRequest {
        width: 832,
        height: 480,
        num_frames: 1,
        infer_steps: 20,
        ..request(1)
    };
    let quiet = tiny_pipeline();
    let shown = tiny_pipeline().with_previews(Some(NonZeroUsize::MIN));
    let run = |pipeline: &Pipeline<OrtBackend>| {
        let mut previews = 0;
        pipeline
            .generate(
                &job,
                &CancelToken::default(),
                &mut |p| previews += usize::from(p.preview.is_some()),
                &mut |_| Ok(()),
            )
            .unwrap();
        previews
    };
    assert_eq!(run(&shown), 20);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("job_20_steps_no_previews", |b| b.iter(|| run(&quiet)));
    group.bench_function("job_20_steps_preview_every_step", |b| {
        b.iter(|| run(&shown))
    });
    group.finish();
}

criterion_group!(
    benches,
    previews,
    few_step_against_base,
    step_cache_50_steps,
    two_jobs,
    denoise_and_decode,
    scheduler_and_noise,
    encode_81_frames
);
criterion_main!(benches);

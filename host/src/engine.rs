//! The model as jobs run it, in one place for `wanserve generate`, `calibrate-cache` and the
//! server's job workers: the model and device options (one clap struct, flattened into each
//! command, its defaults written once in [`ModelSettings::DEFAULT`]), loading the pipeline, and
//! rendering one request into a video file.

use crate::backend::{Backend, BackendError, CudaMemory, Device, LoadOptions, OrtBackend};
use crate::model::{ModelDir, ModelError, Verify, bundled_model_dir};
use crate::pipeline::step_cache::SkipPlan;
use crate::pipeline::{
    CancelToken, FrameChunk, GenerateRequest, Pipeline, PipelineError, Progress, Stage,
};
use crate::video::{EncodeError, H264, VideoEncoder};
use ndarray::Array5;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The model and device flags every command that runs the model takes. Each is optional so that
/// `serve` can fall back on its config file; [`ModelArgs::resolve`] applies the defaults.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModelArgs {
    #[arg(
        long,
        env = "WANSERVE_MODEL_DIR",
        help = "A wanserve model directory (from models/export.py) [default: the bundled tiny random-weight model]"
    )]
    pub model_dir: Option<PathBuf>,
    /// Hash every model file at start, even those unchanged since they last verified on this
    /// machine.
    #[arg(long, env = "WANSERVE_VERIFY_MODEL")]
    pub verify_model: bool,
    #[arg(long, env = "WANSERVE_DEVICE", value_enum,
        help = format!("Where the model runs [default: {}]", value_name(ModelSettings::DEFAULT.device)))]
    pub device: Option<Device>,
    /// Where the text encoder runs, if not on --device: `cpu` keeps its weights off the GPU.
    #[arg(long, env = "WANSERVE_TEXT_ENCODER_DEVICE", value_enum)]
    pub text_encoder_device: Option<Device>,
    /// Classifier-free guidance as one batch-2 DiT call per step instead of two (same result;
    /// ~20 % slower on the CPU with the tiny model, meant for measuring on a GPU).
    #[arg(long, env = "WANSERVE_BATCH_CFG")]
    pub batch_cfg: bool,
    #[arg(long, env = "WANSERVE_THREADS",
        help = format!("Intra-op threads per ONNX session, 0 = one per core [default: {}]", ModelSettings::DEFAULT.threads))]
    pub threads: Option<usize>,
    #[arg(long, env = "WANSERVE_CUDA_MEMORY", value_enum,
        help = format!("On CUDA, `lean` bounds cuDNN's workspace and the arenas' growth; `exhaustive` is ONNX Runtime's defaults (more GPU memory, slower first steps) [default: {}]",
            value_name(ModelSettings::DEFAULT.cuda_memory)))]
    pub cuda_memory: Option<CudaMemory>,
}

/// The same settings from a config file (`serve`'s `[server]` table), below the flags.
#[derive(Debug, Clone, Default)]
pub struct ModelTable {
    pub model_dir: Option<PathBuf>,
    pub verify_model: Option<bool>,
    pub device: Option<String>,
    pub text_encoder_device: Option<String>,
    pub batch_cfg: Option<bool>,
    pub threads: Option<usize>,
    pub cuda_memory: Option<String>,
}

/// What the model runs with, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    /// `None`: the bundled tiny model.
    pub model_dir: Option<PathBuf>,
    pub verify_model: Verify,
    pub device: Device,
    pub text_encoder_device: Option<Device>,
    pub batch_cfg: bool,
    pub threads: usize,
    pub cuda_memory: CudaMemory,
}

/// A config-file value that names no variant of its flag's enum.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct SettingError {
    pub key: &'static str,
    pub reason: String,
}

fn value_name<T: clap::ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// A value of a flag's enum spelled in a config file, as the flag would take it ("cpu", "lean").
pub fn named<T: clap::ValueEnum>(key: &'static str, name: &str) -> Result<T, SettingError> {
    T::from_str(name, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        SettingError {
            key,
            reason: format!("{name:?} is not {}", names.join(" or ")),
        }
    })
}

impl ModelSettings {
    pub const DEFAULT: ModelSettings = ModelSettings {
        model_dir: None,
        verify_model: Verify::Changed,
        device: Device::Cpu,
        text_encoder_device: None,
        batch_cfg: false,
        threads: 0,
        cuda_memory: CudaMemory::Lean,
    };

    /// The model directory in use.
    pub fn model_dir(&self) -> PathBuf {
        self.model_dir.clone().unwrap_or_else(bundled_model_dir)
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            text_encoder_device: self.text_encoder_device,
            threads: self.threads,
            cuda_memory: self.cuda_memory,
        }
    }
}

impl ModelArgs {
    /// Flags over `table` (keys named `server.<field>` in errors) over the defaults.
    pub fn resolve(self, table: ModelTable) -> Result<ModelSettings, SettingError> {
        let d = ModelSettings::DEFAULT;
        let device = match (self.device, table.device.as_deref()) {
            (Some(v), _) => v,
            (None, Some(name)) => named("server.device", name)?,
            (None, None) => d.device,
        };
        let text_encoder_device = match (self.text_encoder_device, table.text_encoder_device) {
            (Some(v), _) => Some(v),
            (None, Some(name)) => Some(named("server.text_encoder_device", &name)?),
            (None, None) => d.text_encoder_device,
        };
        let cuda_memory = match (self.cuda_memory, table.cuda_memory.as_deref()) {
            (Some(v), _) => v,
            (None, Some(name)) => named("server.cuda_memory", name)?,
            (None, None) => d.cuda_memory,
        };
        Ok(ModelSettings {
            model_dir: self.model_dir.or(table.model_dir),
            verify_model: if self.verify_model || table.verify_model.unwrap_or(false) {
                Verify::Full
            } else {
                d.verify_model
            },
            device,
            text_encoder_device,
            batch_cfg: self.batch_cfg || table.batch_cfg.unwrap_or(d.batch_cfg),
            threads: self.threads.or(table.threads).unwrap_or(d.threads),
            cuda_memory,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("warm-up failed: {0}")]
    WarmUp(PipelineError),
}

/// The ONNX Runtime pipeline for `model` with `settings` (sessions and arithmetic graphs
/// built; not yet warmed up).
pub fn load_pipeline(
    model: &ModelDir,
    settings: &ModelSettings,
) -> Result<Pipeline<OrtBackend>, LoadError> {
    let backend = OrtBackend::load_with(model, settings.load_options())?;
    Ok(Pipeline::new(backend, model)?.with_batched_guidance(settings.batch_cfg))
}

/// [`load_pipeline`], then one warm-up step through every graph (what the server waits for
/// before it claims jobs).
pub fn load_warm_pipeline(
    model: &ModelDir,
    settings: &ModelSettings,
) -> Result<Pipeline<OrtBackend>, LoadError> {
    let started = Instant::now();
    let pipeline = load_pipeline(model, settings)?;
    pipeline.warm_up().map_err(LoadError::WarmUp)?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f32(),
        "model loaded and warmed up"
    );
    Ok(pipeline)
}

/// Why a render produced no video.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The encoder could not start, take frames or finish the file.
    #[error("encoding the video failed: {0}")]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Pipeline(PipelineError),
}

impl From<PipelineError> for RenderError {
    fn from(e: PipelineError) -> Self {
        match e {
            // The sink is the encoder: its error is an encoding failure, whatever carried it.
            PipelineError::Sink(sink) => match sink.downcast::<EncodeError>() {
                Ok(encode) => RenderError::Encode(*encode),
                Err(other) => RenderError::Pipeline(PipelineError::Sink(other)),
            },
            other => RenderError::Pipeline(other),
        }
    }
}

/// What a render leaves besides the file.
pub struct Rendered {
    pub path: PathBuf,
    pub frames: usize,
    /// The final latents (before VAE decoding).
    pub latents: Array5<f32>,
    /// Wall time of VAE decoding and encoding, from the first decoded chunk's start.
    pub decode_time: Option<Duration>,
}

/// `request` through `pipeline` into a video at `output`, written by `encoder` as frames are
/// decoded. Nothing is left at `output` unless it succeeds.
pub fn render<B: Backend>(
    pipeline: &Pipeline<B>,
    encoder: &dyn VideoEncoder,
    request: &GenerateRequest,
    output: &Path,
    cancel: &CancelToken,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Rendered, RenderError> {
    let mut writer = encoder.create(
        output,
        request.width,
        request.height,
        pipeline.manifest().fps,
    )?;
    let mut decode_started = None;
    let generated = pipeline.generate(
        request,
        cancel,
        &mut |p| {
            if p.stage == Stage::Decoding && p.step == 0 {
                decode_started = Some(Instant::now());
            }
            on_progress(p)
        },
        &mut |chunk: FrameChunk<'_>| Ok(writer.write_rgb(chunk.rgb, chunk.count)?),
    )?;
    let path = writer.finish()?;
    Ok(Rendered {
        path,
        frames: generated.frames,
        latents: generated.latents,
        decode_time: decode_started.map(|t| t.elapsed()),
    })
}

/// What the job workers run a job with: a loaded pipeline and its encoder, behind a trait so
/// that the workers neither name a runtime nor need one in their tests.
pub trait Renderer: Send + Sync {
    /// Which steps `request` would skip (for its ETA; none when the model cannot say).
    fn skip_plan(&self, request: &GenerateRequest) -> SkipPlan;
    fn render(
        &self,
        request: &GenerateRequest,
        output: &Path,
        cancel: &CancelToken,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered, RenderError>;
}

/// The renderers of the models a server serves, by the name a job's `model` gives.
#[derive(Clone, Default)]
pub struct Renderers(std::collections::BTreeMap<String, std::sync::Arc<dyn Renderer>>);

impl Renderers {
    /// One model, under `name`.
    pub fn one(name: &str, renderer: std::sync::Arc<dyn Renderer>) -> Self {
        let mut renderers = Self::default();
        renderers.insert(name, renderer);
        renderers
    }

    pub fn insert(&mut self, name: &str, renderer: std::sync::Arc<dyn Renderer>) {
        self.0.insert(name.to_string(), renderer);
    }

    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<dyn Renderer>> {
        self.0.get(name)
    }

    /// The models' names, in order.
    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }
}

/// A pipeline over any [`Backend`] with the encoder its videos are written by.
pub struct Engine<B> {
    pub pipeline: Pipeline<B>,
    pub encoder: Box<dyn VideoEncoder>,
}

impl<B> Engine<B> {
    /// `pipeline` writing H.264 mp4s (the server's and `generate`'s format).
    pub fn h264(pipeline: Pipeline<B>) -> Self {
        Self {
            pipeline,
            encoder: Box::new(H264::default()),
        }
    }
}

impl<B: Backend> Renderer for Engine<B> {
    fn skip_plan(&self, request: &GenerateRequest) -> SkipPlan {
        crate::pipeline::skip_plan_or_none(self.pipeline.manifest(), request)
    }

    fn render(
        &self,
        request: &GenerateRequest,
        output: &Path,
        cancel: &CancelToken,
        on_progress: &mut dyn FnMut(Progress),
    ) -> Result<Rendered, RenderError> {
        render(
            &self.pipeline,
            self.encoder.as_ref(),
            request,
            output,
            cancel,
            on_progress,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        model: ModelArgs,
    }

    fn resolve(flags: &[&str], table: ModelTable) -> Result<ModelSettings, SettingError> {
        let mut argv = vec!["wanserve"];
        argv.extend_from_slice(flags);
        Flags::try_parse_from(argv)
            .map_err(|e| SettingError {
                key: "flags",
                reason: e.to_string(),
            })?
            .model
            .resolve(table)
    }

    #[test]
    fn no_flags_and_no_file_give_the_defaults_the_help_names() {
        let settings = resolve(&[], ModelTable::default()).expect("settings");
        assert_eq!(settings, ModelSettings::DEFAULT);
        let help = <Flags as clap::CommandFactory>::command()
            .render_help()
            .to_string();
        for shown in [
            "Where the model runs [default: cpu]",
            "one per core [default: 0]",
            "slower first steps) [default: lean]",
        ] {
            assert!(help.contains(shown), "{shown:?} not in:\n{help}");
        }
    }

    #[test]
    fn a_flag_beats_the_file_and_a_bad_file_value_names_its_key() {
        let table = ModelTable {
            device: Some("cuda".into()),
            threads: Some(3),
            cuda_memory: Some("exhaustive".into()),
            ..ModelTable::default()
        };
        let from_file = resolve(&[], table.clone()).expect("settings");
        assert_eq!(
            (from_file.device, from_file.threads, from_file.cuda_memory),
            (Device::Cuda, 3, CudaMemory::Exhaustive)
        );
        let flagged = resolve(&["--device", "cpu", "--threads", "1"], table).expect("settings");
        assert_eq!((flagged.device, flagged.threads), (Device::Cpu, 1));
        let bad = ModelTable {
            cuda_memory: Some("small".into()),
            ..ModelTable::default()
        };
        let e = resolve(&[], bad).expect_err("an unknown mode was accepted");
        assert_eq!(e.key, "server.cuda_memory");
        assert!(e.reason.contains("lean or exhaustive"), "{e}");
    }
}

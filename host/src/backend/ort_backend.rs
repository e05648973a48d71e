//! [`Backend`] over ONNX Runtime: one session per exported graph, shared by every job.
//!
//! `ort::Session::run` takes `&mut self`, so each session sits behind a mutex and concurrent jobs
//! interleave call by call (a denoising step of one job, then of the other); the sessions and
//! their weights exist once.

use super::arithmetic::{DeviceTensor, OrtTensors, run_on_device};
use super::{Backend, BackendError, RunControl, runtime};
use crate::model::ModelDir;
use half::bf16;
use ndarray::{Array3, Array5, ArrayView5, Ix3, Ix5};
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{RunOptions, Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use std::borrow::Cow;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

struct Graph {
    name: &'static str,
    session: Mutex<Session>,
    device: Device,
    /// Whether the graph's float inputs are bfloat16 (converted at the boundary).
    bf16: bool,
    /// Name of the first output (the one the pipeline uses).
    output: String,
}

/// The VAE decoder's causal cache between chunks: the decoder graph's cache outputs, fed back
/// as its cache inputs.
pub struct OrtVaeCache(Vec<DynValue>);

/// One job's ORT run options: terminating them stops the session run in progress (ORT checks
/// the flag between kernels) and fails every later run made with them.
#[derive(Clone)]
pub struct OrtRunControl {
    options: Arc<JobRunOptions>,
    releasing: bool,
}

struct JobRunOptions {
    steady: RunOptions,
    /// The same, plus arena shrinkage at the end of the run, per device (index: `Device as
    /// usize`): ORT fails a run whose shrink list names a device the session has no arena on.
    releasing: [RunOptions; 2],
}

impl OrtRunControl {
    fn new() -> ort::Result<Self> {
        let releasing = |devices: &str| -> ort::Result<RunOptions> {
            let mut options = RunOptions::new()?;
            options.set("memory.enable_memory_arena_shrinkage", devices)?;
            Ok(options)
        };
        Ok(Self {
            options: Arc::new(JobRunOptions {
                steady: RunOptions::new()?,
                releasing: [releasing("cpu:0")?, releasing("gpu:0")?],
            }),
            releasing: false,
        })
    }

    /// The options for a run of a session on `device`.
    fn for_device(&self, device: Device) -> &RunOptions {
        if self.releasing {
            &self.options.releasing[device as usize]
        } else {
            &self.options.steady
        }
    }
}

impl RunControl for OrtRunControl {
    fn interrupt(&self) {
        let all = [&self.options.steady]
            .into_iter()
            .chain(&self.options.releasing);
        for options in all {
            if let Err(e) = options.terminate() {
                tracing::warn!(error = %e, "cannot interrupt a run; it stops at the end of its step");
            }
        }
    }

    fn releasing(&self) -> Self {
        Self {
            options: self.options.clone(),
            releasing: true,
        }
    }
}

pub struct OrtBackend {
    text_encoder: Graph,
    transformer: Graph,
    vae_init: Graph,
    vae_step: Graph,
    cache_slots: usize,
    device: Device,
    /// Latents stay on the device between steps: guidance and UniPC run there as ORT graphs.
    arithmetic: OrtTensors,
}

/// Session options for `device`: CUDA with CPU fallback disabled, so that a node the GPU cannot
/// run is a load error, never a silent CPU slowdown. `threads` = 0 lets ORT choose.
pub(crate) fn session_builder(
    env: &ort::environment::Environment,
    device: Device,
    threads: usize,
) -> ort::Result<SessionBuilder> {
    let mut builder = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(ort::Error::<()>::from)?;
    if threads > 0 {
        builder = builder
            .with_intra_threads(threads)
            .map_err(ort::Error::<()>::from)?;
    }
    if device == Device::Cuda {
        builder = builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(ort::Error::<()>::from)?
            .with_disable_cpu_fallback()
            .map_err(ort::Error::<()>::from)?;
    }
    Ok(builder)
}

fn load(
    model: &ModelDir,
    file: &str,
    name: &'static str,
    device: Device,
    threads: usize,
) -> Result<Graph, BackendError> {
    let env = runtime::environment()?;
    let path = model.file(file);
    let fail = |e: ort::Error| BackendError::Load {
        graph: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut builder = session_builder(env, device, threads).map_err(fail)?;
    let session = builder.commit_from_file(&path).map_err(fail)?;
    let bf16 = session.inputs().iter().any(|input| {
        matches!(
            input.dtype(),
            ValueType::Tensor {
                ty: TensorElementType::Bfloat16,
                ..
            }
        )
    });
    let output = session
        .outputs()
        .first()
        .map(|o| o.name().to_string())
        .ok_or_else(|| BackendError::Load {
            graph: path.display().to_string(),
            reason: "the graph has no output".into(),
        })?;
    Ok(Graph {
        name,
        session: Mutex::new(session),
        device,
        bf16,
        output,
    })
}

/// Where and how the sessions run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    pub device: Device,
    /// The text encoder's device, when not `device`: on the CPU it leaves the GPU's memory to
    /// the DiT and the VAE (it runs once or twice per job; its output crosses to the GPU once).
    pub text_encoder_device: Option<Device>,
    /// Intra-op threads per session; 0 lets ORT choose (one per core).
    pub threads: usize,
}

impl OrtBackend {
    /// Builds the four sessions and every tensor-arithmetic graph on `device`. `threads` = 0
    /// lets ORT choose (one per core).
    pub fn load(model: &ModelDir, device: Device, threads: usize) -> Result<Self, BackendError> {
        Self::load_with(
            model,
            LoadOptions {
                device,
                text_encoder_device: None,
                threads,
            },
        )
    }

    pub fn load_with(model: &ModelDir, options: LoadOptions) -> Result<Self, BackendError> {
        let LoadOptions {
            device, threads, ..
        } = options;
        let text_device = options.text_encoder_device.unwrap_or(device);
        let m = &model.manifest;
        let backend = Self {
            text_encoder: load(
                model,
                &m.text_encoder.file,
                "text encoder",
                text_device,
                threads,
            )?,
            transformer: load(model, &m.transformer.file, "transformer", device, threads)?,
            vae_init: load(
                model,
                &m.vae.init_file,
                "VAE decoder (first chunk)",
                device,
                threads,
            )?,
            vae_step: load(model, &m.vae.step_file, "VAE decoder", device, threads)?,
            cache_slots: m.vae.cache_slots.len(),
            device,
            // One thread: the sums are memory-bound, and a second thread pool spinning beside the
            // transformer's slowed each step's first DiT call by ~40% on 2 cores.
            arithmetic: OrtTensors::new(device, 5, 1),
        };
        backend.arithmetic.build_all(backend.transformer.bf16)?;
        Ok(backend)
    }
}

fn float_input(graph: &Graph, shape: &[usize], data: Vec<f32>) -> Result<DynValue, BackendError> {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let value = if graph.bf16 {
        let data: Vec<bf16> = data.into_iter().map(bf16::from_f32).collect();
        Tensor::from_array((shape, data)).map(|t| t.into_dyn())
    } else {
        Tensor::from_array((shape, data)).map(|t| t.into_dyn())
    };
    value.map_err(|e| BackendError::Run {
        graph: graph.name,
        reason: e.to_string(),
    })
}

fn float_output(graph: &Graph, value: &DynValue) -> Result<ndarray::ArrayD<f32>, BackendError> {
    let bad = |e: ort::Error| BackendError::Output {
        graph: graph.name,
        reason: e.to_string(),
    };
    if graph.bf16 {
        Ok(value
            .try_extract_array::<bf16>()
            .map_err(bad)?
            .mapv(f32::from))
    } else {
        Ok(value.try_extract_array::<f32>().map_err(bad)?.to_owned())
    }
}

fn run(
    graph: &Graph,
    inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)>,
    control: &OrtRunControl,
) -> Result<Vec<DynValue>, BackendError> {
    let mut session = graph
        .session
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let outputs = session
        .run_with_options(inputs, control.for_device(graph.device))
        .map_err(|e| BackendError::Run {
            graph: graph.name,
            reason: e.to_string(),
        })?;
    Ok(outputs.into_iter().map(|(_, v)| v).collect())
}

fn dims5(graph: &Graph, a: ndarray::ArrayD<f32>) -> Result<Array5<f32>, BackendError> {
    a.into_dimensionality::<Ix5>()
        .map_err(|e| BackendError::Output {
            graph: graph.name,
            reason: e.to_string(),
        })
}

fn owned_input(graph: &Graph, view: ArrayView5<f32>) -> Result<DynValue, BackendError> {
    let shape = view.shape().to_vec();
    float_input(graph, &shape, view.iter().copied().collect())
}

impl OrtBackend {
    fn decode(
        &self,
        graph: &Graph,
        latent: ArrayView5<f32>,
        cache: Option<OrtVaeCache>,
        control: &OrtRunControl,
    ) -> Result<(Array5<f32>, OrtVaeCache), BackendError> {
        let mut inputs: Vec<(Cow<'static, str>, SessionInputValue<'_>)> =
            vec![("latent".into(), owned_input(graph, latent)?.into())];
        if let Some(OrtVaeCache(values)) = cache {
            for (i, value) in values.into_iter().enumerate() {
                inputs.push((format!("cache_{i}").into(), value.into()));
            }
        }
        let mut outputs = run(graph, inputs, control)?.into_iter();
        let video = outputs.next().ok_or(BackendError::Output {
            graph: graph.name,
            reason: "no video output".into(),
        })?;
        let video = dims5(graph, float_output(graph, &video)?)?;
        let cache: Vec<DynValue> = outputs.collect();
        if cache.len() != self.cache_slots {
            return Err(BackendError::Output {
                graph: graph.name,
                reason: format!(
                    "{} cache outputs, the manifest says {}",
                    cache.len(),
                    self.cache_slots
                ),
            });
        }
        Ok((video, OrtVaeCache(cache)))
    }
}

impl Backend for OrtBackend {
    type Latents = DeviceTensor;
    type Context = DeviceTensor;
    type Arithmetic = OrtTensors;
    type VaeCache = OrtVaeCache;
    type RunControl = OrtRunControl;

    fn run_control(&self) -> Result<OrtRunControl, BackendError> {
        OrtRunControl::new().map_err(|e| BackendError::Run {
            graph: "run options",
            reason: e.to_string(),
        })
    }

    fn encode_text(
        &self,
        input_ids: &[i64],
        attention_mask: &[i64],
        batch: usize,
        control: &OrtRunControl,
    ) -> Result<Array3<f32>, BackendError> {
        let graph = &self.text_encoder;
        let len = input_ids.len() / batch.max(1);
        let tensor = |data: &[i64]| {
            Tensor::from_array((vec![batch as i64, len as i64], data.to_vec()))
                .map(|t| t.into_dyn())
                .map_err(|e| BackendError::Run {
                    graph: graph.name,
                    reason: e.to_string(),
                })
        };
        let outputs = run(
            graph,
            vec![
                ("input_ids".into(), tensor(input_ids)?.into()),
                ("attention_mask".into(), tensor(attention_mask)?.into()),
            ],
            control,
        )?;
        let hidden = outputs.first().ok_or(BackendError::Output {
            graph: graph.name,
            reason: "no output".into(),
        })?;
        float_output(graph, hidden)?
            .into_dimensionality::<Ix3>()
            .map_err(|e| BackendError::Output {
                graph: graph.name,
                reason: e.to_string(),
            })
    }

    fn arithmetic(&self) -> &OrtTensors {
        &self.arithmetic
    }

    fn upload_latents(&self, latents: &Array5<f32>) -> Result<DeviceTensor, BackendError> {
        let host = DeviceTensor::from_host(latents.shape(), latents.iter().copied().collect())?;
        self.arithmetic.upload(host, "initial latents")
    }

    fn download_latents(&self, latents: &DeviceTensor) -> Result<Array5<f32>, BackendError> {
        let (shape, values) = self.arithmetic.download(latents, "final latents")?;
        let shape: [usize; 5] = shape
            .try_into()
            .map_err(|s: Vec<usize>| BackendError::Output {
                graph: self.transformer.name,
                reason: format!("latents of rank {}", s.len()),
            })?;
        Array5::from_shape_vec(shape, values).map_err(|e| BackendError::Output {
            graph: self.transformer.name,
            reason: e.to_string(),
        })
    }

    fn prepare_context(&self, context: &Array3<f32>) -> Result<DeviceTensor, BackendError> {
        let values: Vec<f32> = context.iter().copied().collect();
        let host = if self.transformer.bf16 {
            DeviceTensor::from_host(
                context.shape(),
                values.into_iter().map(bf16::from_f32).collect(),
            )?
        } else {
            DeviceTensor::from_host(context.shape(), values)?
        };
        self.arithmetic.upload(host, "text context")
    }

    fn prepare_context_pair(
        &self,
        cond: &Array3<f32>,
        uncond: &Array3<f32>,
    ) -> Result<DeviceTensor, BackendError> {
        let pair =
            ndarray::concatenate(ndarray::Axis(0), &[cond.view(), uncond.view()]).map_err(|e| {
                BackendError::Run {
                    graph: self.transformer.name,
                    reason: format!("conditional and unconditional contexts differ in shape: {e}"),
                }
            })?;
        self.prepare_context(&pair)
    }

    fn predict_guided(
        &self,
        latents: &DeviceTensor,
        timestep: i64,
        pair: &DeviceTensor,
        guidance_scale: f32,
        control: &OrtRunControl,
    ) -> Result<DeviceTensor, BackendError> {
        let batch = self.arithmetic.duplicate(latents)?;
        let predictions = self.predict(&batch, timestep, pair, control)?;
        // Batch index 0 is the conditional context.
        self.arithmetic
            .combine_pair(&predictions, [guidance_scale, 1.0 - guidance_scale])
    }

    fn predict(
        &self,
        latents: &DeviceTensor,
        timestep: i64,
        context: &DeviceTensor,
        control: &OrtRunControl,
    ) -> Result<DeviceTensor, BackendError> {
        // Any batch: one timestep per latent, one context each.
        let graph = &self.transformer;
        let failed = |e: ort::Error| BackendError::Run {
            graph: graph.name,
            reason: e.to_string(),
        };
        let batch = latents.value().shape().first().copied().unwrap_or(1).max(1);
        let timestep =
            Tensor::from_array((vec![batch], vec![timestep; batch as usize])).map_err(failed)?;
        // bf16 graphs: latents are cast on the device, both ways; the scheduler stays in f32.
        let cast;
        let hidden = if graph.bf16 {
            cast = self.arithmetic.cast(latents, TensorElementType::Bfloat16)?;
            &cast
        } else {
            latents
        };
        let timestep = timestep.upcast();
        let out = run_on_device(
            &graph.session,
            self.device,
            &[
                ("hidden_states", hidden.value()),
                ("timestep", &timestep),
                ("encoder_hidden_states", context.value()),
            ],
            &graph.output,
            Some(control.for_device(graph.device)),
        )
        .map(DeviceTensor::new)
        .map_err(failed)?;
        if graph.bf16 {
            Ok(self.arithmetic.cast(&out, TensorElementType::Float32)?)
        } else {
            Ok(out)
        }
    }

    fn decode_first(
        &self,
        latent: ArrayView5<f32>,
        control: &OrtRunControl,
    ) -> Result<(Array5<f32>, OrtVaeCache), BackendError> {
        self.decode(&self.vae_init, latent, None, control)
    }

    fn decode_next(
        &self,
        latent: ArrayView5<f32>,
        cache: OrtVaeCache,
        control: &OrtRunControl,
    ) -> Result<(Array5<f32>, OrtVaeCache), BackendError> {
        self.decode(&self.vae_step, latent, Some(cache), control)
    }
}

//! [`Backend`] over ONNX Runtime: one session per exported graph, shared by every job.
//!
//! `ort::Session::run` takes `&mut self`, so each session sits behind a mutex and concurrent jobs
//! interleave call by call (a denoising step of one job, then of the other); the sessions and
//! their weights exist once.

use super::arithmetic::{DeviceTensor, OrtTensors};
use super::contract::{Backend, BackendError};
use super::device_io::{output_memory, run_bound};
use super::ort_graph::{
    Graph, decode_output_memory, dims5, float_output, load, owned_input, run, run_error,
};
use super::ort_run_control::OrtRunControl;
use super::session::{CudaMemory, Device, SessionConfig};
use crate::model::ModelDir;
use half::bf16;
use ndarray::{Array3, Array5, ArrayView5, Ix3};
use ort::memory::MemoryInfo;
use ort::value::{DynTensor, Tensor, TensorElementType};

/// The VAE decoder's causal cache between chunks: the decoder graph's cache outputs, fed back
/// as its cache inputs. They stay in the device's memory (GPU memory with CUDA): at 832x480 the
/// full-resolution slots are hundreds of MiB a chunk, which a plain run would bring to the host
/// and send back for every latent frame.
pub struct OrtVaeCache(Vec<DynTensor>);

pub struct OrtBackend {
    text_encoder: Graph,
    transformer: Graph,
    /// The step-cached pass, for exports that have it (`transformer_skip.onnx`).
    transformer_skip: Option<Graph>,
    vae_init: Graph,
    vae_step: Graph,
    cache_slots: usize,
    device: Device,
    /// Latents stay on the device between steps: guidance and UniPC run there as ORT graphs.
    arithmetic: OrtTensors,
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
    pub cuda_memory: CudaMemory,
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
                cuda_memory: CudaMemory::default(),
            },
        )
    }

    pub fn load_with(model: &ModelDir, options: LoadOptions) -> Result<Self, BackendError> {
        let device = options.device;
        let config = SessionConfig {
            device,
            threads: options.threads,
            cuda_memory: options.cuda_memory,
        };
        let text_device = options.text_encoder_device.unwrap_or(device);
        let m = &model.manifest;
        let text_dtype = m.text_encoder.dtype.as_deref().unwrap_or(&m.dtype);
        for (file, dtype, on) in [
            (&m.text_encoder.file, text_dtype, text_device),
            (&m.transformer.file, m.transformer.dtype.as_str(), device),
        ] {
            // Said before ORT tries: its own error names a missing MatMul kernel.
            if dtype == "bf16" && on == Device::Cpu {
                return Err(BackendError::Load {
                    graph: model.file(file).display().to_string(),
                    reason: "a bf16 graph cannot run on the CPU (ONNX Runtime's CPU provider has \
                             no bf16 kernels): run it on cuda, or export it in fp32 \
                             (models/export.py --dtype fp32, or --text-encoder-dtype fp32 for \
                             --text-encoder-device cpu)"
                        .into(),
                });
            }
        }
        let backend = Self {
            text_encoder: load(
                model,
                &m.text_encoder.file,
                "text encoder",
                SessionConfig {
                    device: text_device,
                    ..config
                },
            )?,
            transformer: load(model, &m.transformer.file, "transformer", config)?,
            // Only where the manifest also has the ratios that decide when to use it.
            transformer_skip: match (&m.transformer.skip_file, m.step_cache()) {
                (Some(file), Some(_)) => {
                    Some(load(model, file, "transformer (step-cached pass)", config)?)
                }
                _ => None,
            },
            vae_init: load(model, &m.vae.init_file, "VAE decoder (first chunk)", config)?,
            vae_step: load(model, &m.vae.step_file, "VAE decoder", config)?,
            cache_slots: m.vae.cache_slots.len(),
            device,
            // One thread: the sums are memory-bound, and a second thread pool spinning beside the
            // transformer's slowed each step's first DiT call by ~40% on 2 cores.
            arithmetic: OrtTensors::with_config(
                SessionConfig {
                    threads: 1,
                    ..config
                },
                5,
            ),
        };
        backend.arithmetic.build_all(backend.transformer.bf16)?;
        Ok(backend)
    }
}

impl OrtBackend {
    /// One DiT graph run on the device: latents (cast for bf16 graphs), a timestep per batch
    /// entry, and `extra` (the text context, or a step-cached pass's residual); its first
    /// `outputs` outputs stay in the device's memory.
    fn run_dit(
        &self,
        graph: &Graph,
        latents: &DeviceTensor,
        timestep: i64,
        extra: (&str, &DeviceTensor),
        outputs: usize,
        control: &OrtRunControl,
    ) -> Result<Vec<DeviceTensor>, BackendError> {
        let failed = |e: ort::Error| run_error(graph.name, e);
        // Any batch: one timestep per latent, one context (or residual) each.
        let batch = latents.value().shape().first().copied().unwrap_or(1).max(1);
        let timestep = Tensor::from_array((vec![batch], vec![timestep; batch as usize]))
            .map_err(failed)?
            .upcast();
        // bf16 graphs: latents are cast on the device, both ways; the scheduler stays in f32.
        let cast;
        let hidden = if graph.bf16 {
            cast = self.arithmetic.cast(latents, TensorElementType::Bfloat16)?;
            &cast
        } else {
            latents
        };
        if graph.outputs.len() < outputs {
            return Err(BackendError::Output {
                graph: graph.name,
                reason: format!(
                    "{} outputs, {outputs} needed (export the model again for step caching)",
                    graph.outputs.len()
                ),
            });
        }
        let memory = output_memory(self.device).map_err(failed)?;
        let bound: Vec<(&str, &MemoryInfo<'static>)> = graph.outputs[..outputs]
            .iter()
            .map(|name| (name.as_str(), &memory))
            .collect();
        let mut session = graph
            .session
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let values = run_bound(
            &mut session,
            self.device,
            &[
                ("hidden_states", hidden.value()),
                ("timestep", &timestep),
                (extra.0, extra.1.value()),
            ],
            &bound,
            Some(control.for_device(graph.device)),
        )
        .map_err(failed)?;
        if values.len() != outputs {
            return Err(BackendError::Output {
                graph: graph.name,
                reason: format!("{} outputs, {outputs} bound", values.len()),
            });
        }
        Ok(values.into_iter().map(DeviceTensor::new).collect())
    }

    /// A DiT output as the f32 latents the scheduler takes.
    fn prediction(&self, graph: &Graph, out: DeviceTensor) -> Result<DeviceTensor, BackendError> {
        if graph.bf16 {
            Ok(self.arithmetic.cast(&out, TensorElementType::Float32)?)
        } else {
            Ok(out)
        }
    }

    /// One VAE chunk: the video comes back to host memory (the encoder reads it there), the cache
    /// outputs stay where the graph runs, for the next chunk.
    fn decode(
        &self,
        graph: &Graph,
        latent: ArrayView5<f32>,
        cache: Option<OrtVaeCache>,
        control: &OrtRunControl,
    ) -> Result<(Array5<f32>, OrtVaeCache), BackendError> {
        let failed = |e: ort::Error| run_error(graph.name, e);
        let latent = owned_input(graph, latent)?;
        let names: Vec<String> = (0..cache.as_ref().map_or(0, |c| c.0.len()))
            .map(|i| format!("cache_{i}"))
            .collect();
        let mut inputs: Vec<(&str, &DynTensor)> = vec![("latent", &latent)];
        if let Some(OrtVaeCache(values)) = &cache {
            inputs.extend(names.iter().map(String::as_str).zip(values));
        }
        let memory = decode_output_memory(graph.device, graph.outputs.len()).map_err(failed)?;
        let outputs: Vec<(&str, &MemoryInfo<'static>)> = graph
            .outputs
            .iter()
            .map(String::as_str)
            .zip(&memory)
            .collect();
        let mut values = {
            let mut session = graph
                .session
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            run_bound(
                &mut session,
                graph.device,
                &inputs,
                &outputs,
                Some(control.for_device(graph.device)),
            )
            .map_err(failed)?
        }
        .into_iter();
        let video = values.next().ok_or(BackendError::Output {
            graph: graph.name,
            reason: "no video output".into(),
        })?;
        let video = dims5(graph, float_output(graph.name, &video.into_dyn())?)?;
        let cache: Vec<DynTensor> = values.collect();
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
    type Residual = DeviceTensor;

    fn run_control(&self) -> Result<OrtRunControl, BackendError> {
        OrtRunControl::new().map_err(|e| run_error("run options", e))
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
                .map_err(|e| run_error(graph.name, e))
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
        float_output(graph.name, hidden)?
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
        let mut outputs = self.run_dit(
            &self.transformer,
            latents,
            timestep,
            ("encoder_hidden_states", context),
            1,
            control,
        )?;
        self.prediction(&self.transformer, outputs.remove(0))
    }

    fn supports_step_cache(&self) -> bool {
        self.transformer_skip.is_some()
    }

    fn predict_keeping_residual(
        &self,
        latents: &DeviceTensor,
        timestep: i64,
        context: &DeviceTensor,
        control: &OrtRunControl,
    ) -> Result<(DeviceTensor, DeviceTensor), BackendError> {
        let graph = &self.transformer;
        let mut outputs = self.run_dit(
            graph,
            latents,
            timestep,
            ("encoder_hidden_states", context),
            2,
            control,
        )?;
        let residual = outputs.pop().ok_or(BackendError::Output {
            graph: graph.name,
            reason: "no residual output (export the model again for step caching)".into(),
        })?;
        Ok((self.prediction(graph, outputs.remove(0))?, residual))
    }

    fn residual_to_host(
        &self,
        residual: &DeviceTensor,
    ) -> Result<(Vec<usize>, Vec<f32>), BackendError> {
        let cast;
        let residual = if self.transformer.bf16 {
            cast = self.arithmetic.cast(residual, TensorElementType::Float32)?;
            &cast
        } else {
            residual
        };
        self.arithmetic.download(residual, "residual")
    }

    fn predict_skipping_blocks(
        &self,
        latents: &DeviceTensor,
        timestep: i64,
        residual: &DeviceTensor,
        control: &OrtRunControl,
    ) -> Result<DeviceTensor, BackendError> {
        let graph = self.transformer_skip.as_ref().ok_or(BackendError::Run {
            graph: "transformer (step-cached pass)",
            reason: "this model has no step-cached pass".into(),
        })?;
        let mut outputs =
            self.run_dit(graph, latents, timestep, ("residual", residual), 1, control)?;
        self.prediction(graph, outputs.remove(0))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::runtime;
    use ort::memory::AllocationDevice;

    /// The VAE's causal cache stays on the GPU between chunks; only the video comes to the host.
    /// Checkable without a GPU (a memory info is a description), and the bundled model's chunk
    /// graphs are read for their real output count.
    #[test]
    fn vae_caches_are_bound_to_the_device_and_the_video_to_the_host() {
        let backend = OrtBackend::load(
            &ModelDir::open(&crate::model::bundled_model_dir()).expect("bundled model"),
            Device::Cpu,
            1,
        )
        .expect("bundled model loads");
        let outputs = backend.vae_step.outputs.len();
        assert_eq!(
            outputs,
            1 + backend.cache_slots,
            "video, then every cache slot"
        );
        let on_cuda = decode_output_memory(Device::Cuda, outputs).expect("memory infos");
        assert_eq!(on_cuda.len(), outputs);
        assert_eq!(on_cuda[0].allocation_device(), AllocationDevice::CPU);
        for cache in &on_cuda[1..] {
            assert_eq!(cache.allocation_device(), AllocationDevice::CUDA);
            assert!(!cache.is_cpu_accessible());
        }
        let on_cpu = decode_output_memory(Device::Cpu, outputs).expect("memory infos");
        assert!(
            on_cpu
                .iter()
                .all(|m| m.allocation_device() == AllocationDevice::CPU)
        );
    }

    #[test]
    fn bf16_graphs_on_the_cpu_are_refused_with_the_way_out() {
        let cpu = LoadOptions {
            device: Device::Cpu,
            text_encoder_device: None,
            threads: 1,
            cuda_memory: CudaMemory::Lean,
        };
        let mut model = ModelDir::open(&crate::model::bundled_model_dir()).expect("bundled model");
        model.manifest.text_encoder.dtype = Some("bf16".into());
        let err = OrtBackend::load_with(&model, cpu).err().expect("refused");
        let message = err.to_string();
        assert!(message.contains("text_encoder.onnx"), "{message}");
        assert!(message.contains("--text-encoder-dtype fp32"), "{message}");

        model.manifest.text_encoder.dtype = Some("fp32".into());
        model.manifest.transformer.dtype = "bf16".into();
        let err = OrtBackend::load_with(&model, cpu).err().expect("refused");
        assert!(err.to_string().contains("transformer.onnx"), "{err}");
    }

    #[test]
    fn float_outputs_are_read_by_their_own_element_type() {
        runtime::environment().expect("ONNX Runtime loads");
        let states = [0.5f32, -1.25, 3.0];
        let as_bf16: Vec<bf16> = states.iter().copied().map(bf16::from_f32).collect();
        let bf16_value = Tensor::from_array((vec![1i64, 3], as_bf16))
            .expect("bf16 tensor")
            .into_dyn();
        let f32_value = Tensor::from_array((vec![1i64, 3], states.to_vec()))
            .expect("f32 tensor")
            .into_dyn();
        for value in [&bf16_value, &f32_value] {
            let read = float_output("text encoder", value).expect("a float output");
            assert_eq!(read.shape(), &[1, 3]);
            assert_eq!(read.iter().copied().collect::<Vec<_>>(), states);
        }
        let ids = Tensor::from_array((vec![2i64], vec![1i64, 2]))
            .expect("i64 tensor")
            .into_dyn();
        let err = float_output("text encoder", &ids).expect_err("int64 is not a float output");
        assert!(err.to_string().contains("text encoder"), "{err}");
    }
}

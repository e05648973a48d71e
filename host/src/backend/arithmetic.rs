//! Weighted sums of latent tensors run by ONNX Runtime on the backend's device: the
//! [`TensorArithmetic`] that lets UniPC and guidance update latents where they live (on the GPU,
//! nothing crosses the bus between steps but the weights). On the CPU EP it runs the same graph
//! in host memory, which is how it is tested here.
//!
//! One small graph per number of terms (built with ORT's model editor, not shipped as files):
//! `sum = Σ weights[i] · t_i`, dynamic shape, float32. Outputs are bound to the device.

use super::contract::BackendError;
use super::device_io::{
    CopyDirection, bind_and_run, host_memory, output_memory, record_copy, run_on_device,
};
use crate::backend::runtime;
use crate::backend::session::{
    CudaMemory, Device, SessionConfig, is_out_of_memory, session_builder,
};
use crate::tensor::{ArithmeticError, TensorArithmetic};
use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::memory::{AllocationDevice, Allocator, MemoryInfo};
use ort::operator::Attribute;
use ort::session::Session;
use ort::value::{
    DynTensor, Outlet, PrimitiveTensorElementType, Shape, SymbolicDimensions, Tensor,
    TensorElementType, ValueType,
};
use std::sync::{Arc, Mutex, OnceLock};

/// UniPC's largest update, the order-3 corrector: last sample, this output, three of history.
pub const MAX_TERMS: usize = 5;

/// A tensor held by ONNX Runtime, on the device its sessions run on.
pub struct DeviceTensor(DynTensor);

impl DeviceTensor {
    /// Host values (float32 or bfloat16) with `shape`, in host memory (what
    /// [`OrtTensors::upload`] sends on).
    pub fn from_host<T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        shape: &[usize],
        values: Vec<T>,
    ) -> Result<Self, BackendError> {
        // Loads the ONNX Runtime library on first use (or says how to install it).
        runtime::environment()?;
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_array((shape, values))
            .map(|t| Self(t.upcast()))
            .map_err(device_error("building a host tensor"))
    }

    /// The float32 values of a tensor in host memory (row-major) with its shape; one on the
    /// device comes back through [`OrtTensors::download`].
    pub fn to_host(&self) -> Result<(Vec<usize>, Vec<f32>), BackendError> {
        if self.0.memory_info().allocation_device() != AllocationDevice::CPU {
            return Err(BackendError::Device {
                what: "reading a float32 tensor",
                reason: "the tensor is in device memory (download it first)".into(),
            });
        }
        let (shape, values) = self
            .0
            .try_extract_tensor::<f32>()
            .map_err(device_error("reading a float32 tensor"))?;
        Ok((
            shape.iter().map(|&d| d.max(0) as usize).collect(),
            values.to_vec(),
        ))
    }

    pub(crate) fn value(&self) -> &DynTensor {
        &self.0
    }

    pub(crate) fn new(value: DynTensor) -> Self {
        Self(value)
    }
}

fn arithmetic_error(e: impl std::fmt::Display) -> ArithmeticError {
    ArithmeticError::Failed(e.to_string())
}

fn device_error(what: &'static str) -> impl Fn(ort::Error) -> BackendError {
    move |e| {
        if is_out_of_memory(&e) {
            BackendError::OutOfMemory {
                graph: what,
                reason: e.to_string(),
            }
        } else {
            BackendError::Device {
                what,
                reason: e.to_string(),
            }
        }
    }
}

/// Runs weighted sums on `device`, one lazily built session per term count.
pub struct OrtTensors {
    config: SessionConfig,
    rank: usize,
    sessions: [OnceLock<Mutex<Session>>; MAX_TERMS],
    /// float32 → bfloat16 and bfloat16 → float32, for bf16 graphs' inputs and outputs.
    casts: [OnceLock<Mutex<Session>>; 2],
    /// For guidance in one batch-2 DiT call: `x → [x, x]` on axis 0, and
    /// `(pair, weights) → weights[0]·pair[0] + weights[1]·pair[1]`.
    pair: [OnceLock<Mutex<Session>>; 2],
    /// Host → device copies, one graph per element type and rank (latents, text context).
    identities: Mutex<Vec<IdentityGraph>>,
}

type IdentityGraph = ((TensorElementType, usize), Arc<Mutex<Session>>);

const DUPLICATE: usize = 0;
const COMBINE: usize = 1;

impl OrtTensors {
    /// Arithmetic over tensors of `rank` dimensions (5 for latents); `threads` as for the
    /// model's sessions (0: ORT's choice).
    pub fn new(device: Device, rank: usize, threads: usize) -> Self {
        let config = SessionConfig {
            device,
            threads,
            cuda_memory: CudaMemory::default(),
        };
        Self::with_config(config, rank)
    }

    /// The same with every session setting given (the model's CUDA memory mode too).
    pub(crate) fn with_config(config: SessionConfig, rank: usize) -> Self {
        Self {
            config,
            rank,
            sessions: Default::default(),
            casts: Default::default(),
            pair: Default::default(),
            identities: Mutex::default(),
        }
    }

    /// Builds every graph now (each weighted sum, and the casts when `bf16`), so that no job pays
    /// for building one mid-run.
    pub fn build_all(&self, bf16: bool) -> Result<(), BackendError> {
        let failed = device_error("building the tensor arithmetic graphs");
        for terms in 1..=MAX_TERMS {
            cached(&self.sessions[terms - 1], || self.build(terms)).map_err(&failed)?;
        }
        if bf16 {
            for (index, (from, to)) in [
                (TensorElementType::Float32, TensorElementType::Bfloat16),
                (TensorElementType::Bfloat16, TensorElementType::Float32),
            ]
            .into_iter()
            .enumerate()
            {
                cached(&self.casts[index], || self.build_cast(from, to)).map_err(&failed)?;
            }
        }
        cached(&self.pair[DUPLICATE], || self.build_duplicate()).map_err(&failed)?;
        cached(&self.pair[COMBINE], || self.build_combine()).map_err(&failed)?;
        Ok(())
    }

    /// `[x, x]`: a batch of two copies of `x` (batch 1), on the device.
    pub fn duplicate(&self, x: &DeviceTensor) -> Result<DeviceTensor, BackendError> {
        let session = cached(&self.pair[DUPLICATE], || self.build_duplicate())
            .map_err(device_error("building the duplicate graph"))?;
        run_on_device(session, self.config.device, &[("x", &x.0)], "y", None)
            .map(DeviceTensor)
            .map_err(device_error("duplicating a tensor"))
    }

    /// `weights[0]·pair[0] + weights[1]·pair[1]` for a batch-2 `pair`: the same products and sum
    /// as [`TensorArithmetic::weighted_sum`] of the two halves.
    pub fn combine_pair(
        &self,
        pair: &DeviceTensor,
        weights: [f32; 2],
    ) -> Result<DeviceTensor, BackendError> {
        let session = cached(&self.pair[COMBINE], || self.build_combine())
            .map_err(device_error("building the combine graph"))?;
        let weights = Tensor::from_array(([2i64], weights.to_vec()))
            .map_err(device_error("building the weights"))?
            .upcast();
        run_on_device(
            session,
            self.config.device,
            &[("pair", &pair.0), ("weights", &weights)],
            "sum",
            None,
        )
        .map(DeviceTensor)
        .map_err(device_error("combining a batch of two"))
    }

    /// Moves a host tensor to the device (a no-op on the CPU). `what` names it in the copy log.
    pub fn upload(&self, tensor: DeviceTensor, what: &str) -> Result<DeviceTensor, BackendError> {
        match self.config.device {
            Device::Cpu => Ok(tensor),
            Device::Cuda => {
                record_copy(CopyDirection::ToDevice, what, &tensor.0);
                let memory = output_memory(self.config.device)
                    .map_err(device_error("copying a tensor to the device"))?;
                self.copy_through_identity(&tensor, &memory)
            }
        }
    }

    /// The tensor copied into `memory` by an `Identity` graph run on this device (the caller
    /// records the copy under its own name). Not ort's `Tensor::to`: its built-in copy graph
    /// declares an opset whose `Identity` takes no bfloat16, so the bf16 text context failed on
    /// the first GPU run.
    fn copy_through_identity(
        &self,
        tensor: &DeviceTensor,
        memory: &MemoryInfo<'static>,
    ) -> Result<DeviceTensor, BackendError> {
        let failed = device_error("copying a tensor between host and device");
        let (ty, rank) = match tensor.0.dtype() {
            ValueType::Tensor { ty, shape, .. } => (*ty, shape.len()),
            other => {
                return Err(BackendError::Device {
                    what: "copying a tensor to the device",
                    reason: format!("not a tensor: {other:?}"),
                });
            }
        };
        let session = {
            let mut identities = self.identities.lock().unwrap_or_else(|p| p.into_inner());
            match identities.iter().find(|(key, _)| *key == (ty, rank)) {
                Some((_, session)) => Arc::clone(session),
                None => {
                    let session =
                        Arc::new(Mutex::new(self.build_identity(ty, rank).map_err(&failed)?));
                    identities.push(((ty, rank), Arc::clone(&session)));
                    session
                }
            }
        };
        let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
        bind_and_run(&mut session, &[("x", &tensor.0)], &[("y", memory)], None)
            .map_err(failed)?
            .pop()
            .map(DeviceTensor)
            .ok_or(BackendError::Device {
                what: "copying a tensor between host and device",
                reason: "the copy graph returned nothing".into(),
            })
    }

    /// A float32 device tensor's values on the host (a copy only where it is not in host memory).
    pub fn download(
        &self,
        tensor: &DeviceTensor,
        what: &str,
    ) -> Result<(Vec<usize>, Vec<f32>), BackendError> {
        if tensor.0.memory_info().allocation_device() == AllocationDevice::CPU {
            return tensor.to_host();
        }
        record_copy(CopyDirection::ToHost, what, &tensor.0);
        let memory = host_memory().map_err(device_error("copying a tensor to the host"))?;
        self.copy_through_identity(tensor, &memory)?.to_host()
    }

    /// The tensor converted to `to` (float32 or bfloat16), on the device.
    pub fn cast(
        &self,
        tensor: &DeviceTensor,
        to: TensorElementType,
    ) -> Result<DeviceTensor, BackendError> {
        let (index, from) = match to {
            TensorElementType::Bfloat16 => (0, TensorElementType::Float32),
            TensorElementType::Float32 => (1, TensorElementType::Bfloat16),
            other => {
                return Err(BackendError::Device {
                    what: "casting a tensor",
                    reason: format!("no cast to {other:?}"),
                });
            }
        };
        let session = cached(&self.casts[index], || self.build_cast(from, to))
            .map_err(device_error("building the cast graph"))?;
        run_on_device(session, self.config.device, &[("x", &tensor.0)], "y", None)
            .map(DeviceTensor)
            .map_err(device_error("casting a tensor"))
    }

    /// A tensor of this arithmetic's rank with dynamic dimensions.
    fn tensor_type(&self, ty: TensorElementType) -> ValueType {
        dynamic_tensor(ty, self.rank)
    }

    /// A graph of one node from input `x` to output `y`.
    fn one_node(&self, x: ValueType, y: ValueType, node: Node) -> ort::Result<Session> {
        let mut graph = Graph::new()?;
        graph.set_inputs([Outlet::new("x", x)])?;
        graph.set_outputs([Outlet::new("y", y)])?;
        graph.add_node(node)?;
        self.session_for(graph)
    }

    fn build_identity(&self, ty: TensorElementType, rank: usize) -> ort::Result<Session> {
        let node = Node::new("Identity", ONNX_DOMAIN, "copy", ["x"], ["y"], [])?;
        self.one_node(dynamic_tensor(ty, rank), dynamic_tensor(ty, rank), node)
    }

    fn build_cast(&self, from: TensorElementType, to: TensorElementType) -> ort::Result<Session> {
        // ONNX TensorProto data types.
        let onnx_type: i64 = match to {
            TensorElementType::Bfloat16 => 16,
            _ => 1,
        };
        let node = Node::new(
            "Cast",
            ONNX_DOMAIN,
            "cast",
            ["x"],
            ["y"],
            [Attribute::new("to", onnx_type)?],
        )?;
        self.one_node(self.tensor_type(from), self.tensor_type(to), node)
    }

    fn session_for(&self, graph: Graph) -> ort::Result<Session> {
        let mut model = Model::new([Opset::new(ONNX_DOMAIN, 21)?])?;
        model.set_graph(graph)?;
        let env = runtime::environment().map_err(|e| ort::Error::new(e.to_string()))?;
        model.into_session(&session_builder(env, self.config)?)
    }

    fn session(&self, terms: usize) -> Result<&Mutex<Session>, ArithmeticError> {
        let slot = self.sessions.get(terms.wrapping_sub(1)).ok_or_else(|| {
            arithmetic_error(format!("{terms} terms (1 to {MAX_TERMS} supported)"))
        })?;
        cached(slot, || self.build(terms)).map_err(arithmetic_error)
    }

    fn build(&self, terms: usize) -> ort::Result<Session> {
        let float = || self.tensor_type(TensorElementType::Float32);
        let mut graph = Graph::new()?;
        let mut inputs: Vec<Outlet> = (0..terms)
            .map(|i| Outlet::new(format!("t{i}"), float()))
            .collect();
        inputs.push(Outlet::new(
            "weights",
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                shape: Shape::new([terms as i64]),
                dimension_symbols: SymbolicDimensions::empty(1),
            },
        ));
        graph.set_inputs(inputs)?;
        graph.set_outputs([Outlet::new("sum", float())])?;
        add_weighted_sum(&mut graph, terms)?;
        self.session_for(graph)
    }

    fn build_duplicate(&self) -> ort::Result<Session> {
        let float = || self.tensor_type(TensorElementType::Float32);
        let node = Node::new(
            "Concat",
            ONNX_DOMAIN,
            "duplicate",
            ["x", "x"],
            ["y"],
            [Attribute::new("axis", 0i64)?],
        )?;
        self.one_node(float(), float(), node)
    }

    fn build_combine(&self) -> ort::Result<Session> {
        let float = || self.tensor_type(TensorElementType::Float32);
        let mut graph = Graph::new()?;
        graph.set_inputs([
            Outlet::new("pair", float()),
            Outlet::new(
                "weights",
                ValueType::Tensor {
                    ty: TensorElementType::Float32,
                    shape: Shape::new([2]),
                    dimension_symbols: SymbolicDimensions::empty(1),
                },
            ),
        ])?;
        graph.set_outputs([Outlet::new("sum", float())])?;
        graph.add_node(Node::new(
            "Split",
            ONNX_DOMAIN,
            "halves",
            ["pair"],
            ["t0", "t1"],
            [
                Attribute::new("axis", 0i64)?,
                Attribute::new("num_outputs", 2i64)?,
            ],
        )?)?;
        add_weighted_sum(&mut graph, 2)?;
        self.session_for(graph)
    }
}

impl TensorArithmetic for OrtTensors {
    type Tensor = DeviceTensor;

    fn weighted_sum(
        &self,
        terms: &[(f32, &DeviceTensor)],
    ) -> Result<DeviceTensor, ArithmeticError> {
        // The graph would broadcast; a weighted sum of differently shaped latents is a bug.
        let shape = |t: &DeviceTensor| t.0.dtype().tensor_shape().cloned();
        let first = terms.first().map(|(_, t)| shape(t));
        if terms.iter().any(|(_, t)| Some(shape(t)) != first) {
            return Err(arithmetic_error(
                "weighted sum of tensors of different shapes",
            ));
        }
        let session = self.session(terms.len())?;
        let weights: Vec<f32> = terms.iter().map(|(w, _)| *w).collect();
        let weights = Tensor::from_array(([terms.len() as i64], weights))
            .map_err(arithmetic_error)?
            .upcast();
        let names: Vec<String> = (0..terms.len()).map(|i| format!("t{i}")).collect();
        let mut inputs: Vec<(&str, &DynTensor)> = names
            .iter()
            .zip(terms)
            .map(|(name, (_, tensor))| (name.as_str(), &tensor.0))
            .collect();
        inputs.push(("weights", &weights));
        run_on_device(session, self.config.device, &inputs, "sum", None)
            .map(DeviceTensor)
            .map_err(|e| {
                if is_out_of_memory(&e) {
                    ArithmeticError::OutOfMemory(e.to_string())
                } else {
                    arithmetic_error(e)
                }
            })
    }
}

/// A tensor type of `rank` dynamic dimensions.
fn dynamic_tensor(ty: TensorElementType, rank: usize) -> ValueType {
    ValueType::Tensor {
        ty,
        shape: Shape::new(vec![-1i64; rank]),
        dimension_symbols: SymbolicDimensions::new((0..rank).map(|d| format!("d{d}"))),
    }
}

/// `sum = Σ weights[i] · t{i}` for `terms` tensors `t0..` already in `graph`.
fn add_weighted_sum(graph: &mut Graph, terms: usize) -> ort::Result<()> {
    let mut products = Vec::with_capacity(terms);
    for i in 0..terms {
        let mut index = Tensor::<i64>::new(&Allocator::default(), Shape::new([]))?;
        index.extract_tensor_mut().1[0] = i as i64;
        graph.add_initializer(format!("index{i}"), index, false)?;
        graph.add_node(Node::new(
            "Gather",
            ONNX_DOMAIN,
            format!("weight{i}"),
            ["weights".to_string(), format!("index{i}")],
            [format!("w{i}")],
            [],
        )?)?;
        graph.add_node(Node::new(
            "Mul",
            ONNX_DOMAIN,
            format!("scale{i}"),
            [format!("t{i}"), format!("w{i}")],
            [format!("p{i}")],
            [],
        )?)?;
        products.push(format!("p{i}"));
    }
    graph.add_node(Node::new("Sum", ONNX_DOMAIN, "sum", products, ["sum"], [])?)?;
    Ok(())
}

/// The session in `slot`, built on first use.
fn cached(
    slot: &OnceLock<Mutex<Session>>,
    build: impl FnOnce() -> ort::Result<Session>,
) -> ort::Result<&Mutex<Session>> {
    if let Some(session) = slot.get() {
        return Ok(session);
    }
    let session = build()?;
    Ok(slot.get_or_init(|| Mutex::new(session)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort::memory::MemoryType;

    /// The fix for outputs landing in host memory on CUDA: checkable without a GPU, since a
    /// memory info is only a description.
    #[test]
    fn outputs_are_bound_to_the_memory_of_the_device_the_graphs_run_on() {
        runtime::environment().expect("ONNX Runtime (scripts/setup installs it)");
        let cpu = output_memory(Device::Cpu).expect("CPU memory info");
        assert_eq!(cpu.allocation_device(), AllocationDevice::CPU);
        assert!(cpu.is_cpu_accessible());
        let cuda = output_memory(Device::Cuda).expect("CUDA memory info");
        assert_eq!(cuda.allocation_device(), AllocationDevice::CUDA);
        assert_eq!(cuda.device_id(), 0);
        assert_eq!(cuda.memory_type(), MemoryType::Default);
        assert!(
            !cuda.is_cpu_accessible(),
            "GPU memory, not pinned host memory"
        );

        // Every bound output (weighted sums, casts, the DiT) goes through `run_on_device`: on
        // the CPU its output is where `output_memory` says.
        let arithmetic = OrtTensors::new(Device::Cpu, 1, 1);
        let a = DeviceTensor::from_host(&[4], vec![1.0f32; 4]).expect("tensor");
        let sum = arithmetic.weighted_sum(&[(2.0, &a)]).expect("sum");
        assert_eq!(
            sum.0.memory_info().allocation_device(),
            AllocationDevice::CPU
        );
        let cast = arithmetic
            .cast(&a, TensorElementType::Bfloat16)
            .expect("cast");
        assert_eq!(
            cast.0.memory_info().allocation_device(),
            AllocationDevice::CPU
        );
        assert_eq!(
            arithmetic.download(&sum, "sum").expect("download").1,
            vec![2.0; 4]
        );
    }

    /// The copy `upload` makes on CUDA, run on the CPU: the same graph, so a bf16 text context
    /// (what failed on the first GPU run, through ort's `Tensor::to`) and f32 latents come
    /// through with their type, shape and values.
    #[test]
    fn the_upload_copy_keeps_bf16_and_f32_tensors_whole() {
        use half::bf16;
        let arithmetic = OrtTensors::new(Device::Cpu, 5, 1);
        let context: Vec<bf16> = (0..24)
            .map(|i| bf16::from_f32(i as f32 * 0.25 - 2.0))
            .collect();
        let host = DeviceTensor::from_host(&[1, 4, 6], context.clone()).expect("bf16 tensor");
        let copied = arithmetic
            .copy_through_identity(&host, &host_memory().expect("memory"))
            .expect("bf16 copy");
        let (shape, values) = copied.0.try_extract_tensor::<bf16>().expect("still bf16");
        assert_eq!(**shape, [1, 4, 6]);
        assert_eq!(values, context.as_slice());
        assert_eq!(
            copied.0.memory_info().allocation_device(),
            AllocationDevice::CPU
        );

        let latents: Vec<f32> = (0..48).map(|i| i as f32 - 7.5).collect();
        let host = DeviceTensor::from_host(&[1, 2, 2, 3, 4], latents.clone()).expect("f32 tensor");
        let copied = arithmetic
            .copy_through_identity(&host, &host_memory().expect("memory"))
            .expect("f32 copy");
        assert_eq!(
            copied.to_host().expect("host"),
            (vec![1, 2, 2, 3, 4], latents)
        );
    }
}

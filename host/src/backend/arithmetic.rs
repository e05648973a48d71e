//! Weighted sums of latent tensors run by ONNX Runtime on the backend's device: the
//! [`TensorArithmetic`] that lets UniPC and guidance update latents where they live (on the GPU,
//! nothing crosses the bus between steps but the weights). On the CPU EP it runs the same graph
//! in host memory, which is how it is tested here.
//!
//! One small graph per number of terms (built with ORT's model editor, not shipped as files):
//! `sum = Σ weights[i] · t_i`, dynamic shape, float32. Outputs are bound to the device.

use crate::backend::ort_backend::{Device, session_builder};
use crate::backend::runtime;
use crate::pipeline::scheduler::{SchedulerError, TensorArithmetic};
use ort::editor::{Graph, Model, Node, ONNX_DOMAIN, Opset};
use ort::memory::{AllocationDevice, Allocator};
use ort::operator::Attribute;
use ort::session::Session;
use ort::value::{
    DynTensor, DynTensorValueType, Outlet, PrimitiveTensorElementType, Shape, SymbolicDimensions,
    Tensor, TensorElementType, ValueType,
};
use std::sync::{Mutex, OnceLock};

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
    ) -> Result<Self, SchedulerError> {
        // Loads the ONNX Runtime library on first use (or says how to install it).
        runtime::environment().map_err(arithmetic_error)?;
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_array((shape, values))
            .map(|t| Self(t.upcast()))
            .map_err(arithmetic_error)
    }

    /// Copies float32 values back to host memory (row-major) with their shape.
    pub fn to_host(&self) -> Result<(Vec<usize>, Vec<f32>), SchedulerError> {
        let on_host;
        let tensor = if self.0.memory_info().allocation_device() == AllocationDevice::CPU {
            &self.0
        } else {
            on_host = self
                .0
                .to(AllocationDevice::CPU, 0)
                .map_err(arithmetic_error)?;
            &on_host
        };
        let (shape, values) = tensor
            .try_extract_tensor::<f32>()
            .map_err(arithmetic_error)?;
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

fn arithmetic_error(e: impl std::fmt::Display) -> SchedulerError {
    SchedulerError::Arithmetic(e.to_string())
}

/// Runs weighted sums on `device`, one lazily built session per term count.
pub struct OrtTensors {
    device: Device,
    rank: usize,
    threads: usize,
    sessions: [OnceLock<Mutex<Session>>; MAX_TERMS],
    /// float32 → bfloat16 and bfloat16 → float32, for bf16 graphs' inputs and outputs.
    casts: [OnceLock<Mutex<Session>>; 2],
}

impl OrtTensors {
    /// Arithmetic over tensors of `rank` dimensions (5 for latents); `threads` as for the
    /// model's sessions (0: ORT's choice).
    pub fn new(device: Device, rank: usize, threads: usize) -> Self {
        Self {
            device,
            rank,
            threads,
            sessions: Default::default(),
            casts: Default::default(),
        }
    }

    /// Moves a host tensor to the device (a no-op on the CPU).
    pub fn upload(&self, tensor: DeviceTensor) -> Result<DeviceTensor, SchedulerError> {
        match self.device {
            Device::Cpu => Ok(tensor),
            Device::Cuda => tensor
                .0
                .to(AllocationDevice::CUDA, 0)
                .map(DeviceTensor)
                .map_err(arithmetic_error),
        }
    }

    /// The tensor converted to `to` (float32 or bfloat16), on the device.
    pub fn cast(
        &self,
        tensor: &DeviceTensor,
        to: TensorElementType,
    ) -> Result<DeviceTensor, SchedulerError> {
        let (index, from) = match to {
            TensorElementType::Bfloat16 => (0, TensorElementType::Float32),
            TensorElementType::Float32 => (1, TensorElementType::Bfloat16),
            other => return Err(arithmetic_error(format!("no cast to {other:?}"))),
        };
        let session = cached(&self.casts[index], || self.build_cast(from, to))?;
        run_on_device(session, &[("x", &tensor.0)], "y")
            .map(DeviceTensor)
            .map_err(arithmetic_error)
    }

    /// A tensor of this arithmetic's rank with dynamic dimensions.
    fn tensor_type(&self, ty: TensorElementType) -> ValueType {
        ValueType::Tensor {
            ty,
            shape: Shape::new(vec![-1i64; self.rank]),
            dimension_symbols: SymbolicDimensions::new((0..self.rank).map(|d| format!("d{d}"))),
        }
    }

    fn build_cast(&self, from: TensorElementType, to: TensorElementType) -> ort::Result<Session> {
        let mut graph = Graph::new()?;
        graph.set_inputs([Outlet::new("x", self.tensor_type(from))])?;
        graph.set_outputs([Outlet::new("y", self.tensor_type(to))])?;
        // ONNX TensorProto data types.
        let onnx_type: i64 = match to {
            TensorElementType::Bfloat16 => 16,
            _ => 1,
        };
        graph.add_node(Node::new(
            "Cast",
            ONNX_DOMAIN,
            "cast",
            ["x"],
            ["y"],
            [Attribute::new("to", onnx_type)?],
        )?)?;
        self.session_for(graph)
    }

    fn session_for(&self, graph: Graph) -> ort::Result<Session> {
        let mut model = Model::new([Opset::new(ONNX_DOMAIN, 21)?])?;
        model.set_graph(graph)?;
        let env = runtime::environment().map_err(|e| ort::Error::new(e.to_string()))?;
        model.into_session(&session_builder(env, self.device, self.threads)?)
    }

    fn session(&self, terms: usize) -> Result<&Mutex<Session>, SchedulerError> {
        let slot = self.sessions.get(terms.wrapping_sub(1)).ok_or_else(|| {
            arithmetic_error(format!("{terms} terms (1 to {MAX_TERMS} supported)"))
        })?;
        cached(slot, || self.build(terms))
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
        self.session_for(graph)
    }
}

impl TensorArithmetic for OrtTensors {
    type Tensor = DeviceTensor;

    fn weighted_sum(&self, terms: &[(f32, &DeviceTensor)]) -> Result<DeviceTensor, SchedulerError> {
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
        run_on_device(session, &inputs, "sum")
            .map(DeviceTensor)
            .map_err(arithmetic_error)
    }
}

/// The session in `slot`, built on first use.
fn cached(
    slot: &OnceLock<Mutex<Session>>,
    build: impl FnOnce() -> ort::Result<Session>,
) -> Result<&Mutex<Session>, SchedulerError> {
    if let Some(session) = slot.get() {
        return Ok(session);
    }
    let session = build().map_err(arithmetic_error)?;
    Ok(slot.get_or_init(|| Mutex::new(session)))
}

/// Runs `session` on `inputs` with its `output` bound to the session's device memory (so a
/// CUDA session's output stays on the GPU).
pub(crate) fn run_on_device(
    session: &Mutex<Session>,
    inputs: &[(&str, &DynTensor)],
    output: &str,
) -> ort::Result<DynTensor> {
    let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
    let mut binding = session.create_binding()?;
    for (name, tensor) in inputs {
        binding.bind_input(*name, *tensor)?;
    }
    binding.bind_output_to_device(output, session.allocator().memory_info())?;
    let mut outputs = session.run_binding(&binding)?;
    outputs
        .remove(output)
        .ok_or_else(|| ort::Error::new(format!("the graph returned no {output}")))?
        .downcast::<DynTensorValueType>()
}

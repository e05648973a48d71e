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
use ort::memory::Allocator;
use ort::session::Session;
use ort::value::{
    DynValue, Outlet, Shape, SymbolicDimensions, Tensor, TensorElementType, ValueType,
};
use std::sync::{Mutex, OnceLock};

/// UniPC's largest update: corrector of order 3 (last sample, this output, three of history).
pub const MAX_TERMS: usize = 6;

/// A float32 tensor held by ONNX Runtime, on the device its sessions run on.
pub struct DeviceTensor(DynValue);

impl DeviceTensor {
    /// Uploads host values with `shape`.
    pub fn from_host(shape: &[usize], values: Vec<f32>) -> Result<Self, SchedulerError> {
        // Loads the ONNX Runtime library on first use (or says how to install it).
        runtime::environment().map_err(arithmetic_error)?;
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_array((shape, values))
            .map(|t| Self(t.into_dyn()))
            .map_err(arithmetic_error)
    }

    /// Copies the values back to host memory (row-major) with their shape.
    pub fn to_host(&self) -> Result<(Vec<usize>, Vec<f32>), SchedulerError> {
        let (shape, values) = self
            .0
            .try_extract_tensor::<f32>()
            .map_err(arithmetic_error)?;
        Ok((
            shape.iter().map(|&d| d.max(0) as usize).collect(),
            values.to_vec(),
        ))
    }
}

fn arithmetic_error(e: impl std::fmt::Display) -> SchedulerError {
    SchedulerError::Arithmetic(e.to_string())
}

/// Runs weighted sums on `device`, one lazily built session per term count.
pub struct OrtTensors {
    device: Device,
    rank: usize,
    sessions: [OnceLock<Mutex<Session>>; MAX_TERMS],
}

impl OrtTensors {
    /// Arithmetic over tensors of `rank` dimensions (5 for latents).
    pub fn new(device: Device, rank: usize) -> Self {
        Self {
            device,
            rank,
            sessions: Default::default(),
        }
    }

    fn session(&self, terms: usize) -> Result<&Mutex<Session>, SchedulerError> {
        let slot = self.sessions.get(terms.wrapping_sub(1)).ok_or_else(|| {
            arithmetic_error(format!("{terms} terms (1 to {MAX_TERMS} supported)"))
        })?;
        if let Some(session) = slot.get() {
            return Ok(session);
        }
        let session = self.build(terms).map_err(arithmetic_error)?;
        Ok(slot.get_or_init(|| Mutex::new(session)))
    }

    fn build(&self, terms: usize) -> ort::Result<Session> {
        let tensor = |rank: usize| ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape: Shape::new(vec![-1i64; rank]),
            dimension_symbols: SymbolicDimensions::new((0..rank).map(|d| format!("d{d}"))),
        };
        let mut graph = Graph::new()?;
        let mut inputs: Vec<Outlet> = (0..terms)
            .map(|i| Outlet::new(format!("t{i}"), tensor(self.rank)))
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
        graph.set_outputs([Outlet::new("sum", tensor(self.rank))])?;
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
        let mut model = Model::new([Opset::new(ONNX_DOMAIN, 21)?])?;
        model.set_graph(graph)?;
        let env = runtime::environment().map_err(|e| ort::Error::new(e.to_string()))?;
        model.into_session(&session_builder(env, self.device, 1)?)
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
        let mut session = self
            .session(terms.len())?
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let weights: Vec<f32> = terms.iter().map(|(w, _)| *w).collect();
        let weights =
            Tensor::from_array(([terms.len() as i64], weights)).map_err(arithmetic_error)?;
        let mut binding = session.create_binding().map_err(arithmetic_error)?;
        for (i, (_, tensor)) in terms.iter().enumerate() {
            binding
                .bind_input(format!("t{i}"), &tensor.0)
                .map_err(arithmetic_error)?;
        }
        binding
            .bind_input("weights", &weights)
            .map_err(arithmetic_error)?;
        binding
            .bind_output_to_device("sum", session.allocator().memory_info())
            .map_err(arithmetic_error)?;
        let mut outputs = session.run_binding(&binding).map_err(arithmetic_error)?;
        outputs
            .remove("sum")
            .map(DeviceTensor)
            .ok_or_else(|| arithmetic_error("the sum graph returned nothing"))
    }
}

//! One exported graph as an ORT session: loading it, feeding it host arrays, reading its
//! outputs by their own element type, and classifying its failures.

use super::contract::BackendError;
use super::device_io::{host_memory, output_memory};
use super::ort_run_control::OrtRunControl;
use super::runtime;
use super::session::{Device, SessionConfig, is_out_of_memory, session_builder};
use crate::model::ModelDir;
use half::bf16;
use ndarray::{Array5, ArrayView5, Ix5};
use ort::memory::MemoryInfo;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType, ValueType};
use std::borrow::Cow;
use std::sync::Mutex;

pub(super) struct Graph {
    pub(super) name: &'static str,
    pub(super) session: Mutex<Session>,
    pub(super) device: Device,
    /// Whether the graph's float inputs are bfloat16 (converted at the boundary).
    pub(super) bf16: bool,
    /// Every output's name, in the graph's order (the VAE's video, then its cache slots); never
    /// empty (`load` refuses a graph without outputs).
    pub(super) outputs: Vec<String>,
}

/// A failed run of `graph`: out of memory when the runtime says so, else the runtime's message.
pub(super) fn run_error(graph: &'static str, e: ort::Error) -> BackendError {
    if is_out_of_memory(&e) {
        BackendError::OutOfMemory {
            graph,
            reason: e.to_string(),
        }
    } else {
        BackendError::Run {
            graph,
            reason: e.to_string(),
        }
    }
}

pub(super) fn load(
    model: &ModelDir,
    file: &str,
    name: &'static str,
    config: SessionConfig,
) -> Result<Graph, BackendError> {
    let env = runtime::environment()?;
    let path = model.file(file);
    let fail = |e: ort::Error| BackendError::Load {
        graph: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut builder = session_builder(env, config).map_err(fail)?;
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
    let outputs: Vec<String> = session
        .outputs()
        .iter()
        .map(|o| o.name().to_string())
        .collect();
    if outputs.is_empty() {
        return Err(BackendError::Load {
            graph: path.display().to_string(),
            reason: "the graph has no output".into(),
        });
    }
    Ok(Graph {
        name,
        session: Mutex::new(session),
        device: config.device,
        bf16,
        outputs,
    })
}

pub(super) fn float_input(
    graph: &Graph,
    shape: &[usize],
    data: Vec<f32>,
) -> Result<DynTensor, BackendError> {
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let value = if graph.bf16 {
        let data: Vec<bf16> = data.into_iter().map(bf16::from_f32).collect();
        Tensor::from_array((shape, data)).map(|t| t.upcast())
    } else {
        Tensor::from_array((shape, data)).map(|t| t.upcast())
    };
    value.map_err(|e| run_error(graph.name, e))
}

/// A float output on the host as f32, whatever float type the graph gives: decided by the value,
/// not by the graph's inputs (a bf16 text encoder takes int64 ids and returns bf16 states).
pub(super) fn float_output(
    graph: &'static str,
    value: &DynValue,
) -> Result<ndarray::ArrayD<f32>, BackendError> {
    let bad = |e: ort::Error| BackendError::Output {
        graph,
        reason: e.to_string(),
    };
    match value.dtype() {
        ValueType::Tensor {
            ty: TensorElementType::Bfloat16,
            ..
        } => Ok(value
            .try_extract_array::<bf16>()
            .map_err(bad)?
            .mapv(f32::from)),
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            ..
        } => Ok(value.try_extract_array::<f32>().map_err(bad)?.to_owned()),
        other => Err(BackendError::Output {
            graph,
            reason: format!("expected a float32 or bfloat16 tensor, got {other}"),
        }),
    }
}

pub(super) fn run(
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
        .map_err(|e| run_error(graph.name, e))?;
    Ok(outputs.into_iter().map(|(_, v)| v).collect())
}

pub(super) fn dims5(graph: &Graph, a: ndarray::ArrayD<f32>) -> Result<Array5<f32>, BackendError> {
    a.into_dimensionality::<Ix5>()
        .map_err(|e| BackendError::Output {
            graph: graph.name,
            reason: e.to_string(),
        })
}

pub(super) fn owned_input(graph: &Graph, view: ArrayView5<f32>) -> Result<DynTensor, BackendError> {
    let shape = view.shape().to_vec();
    float_input(graph, &shape, view.iter().copied().collect())
}

/// Where a VAE chunk graph's `outputs` are bound on `device`: the video (first) in host memory,
/// every cache slot in the device's.
pub(super) fn decode_output_memory(
    device: Device,
    outputs: usize,
) -> ort::Result<Vec<MemoryInfo<'static>>> {
    let mut memory = Vec::with_capacity(outputs);
    if outputs > 0 {
        memory.push(host_memory()?);
    }
    for _ in 1..outputs {
        memory.push(output_memory(device)?);
    }
    Ok(memory)
}

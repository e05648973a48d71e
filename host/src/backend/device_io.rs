//! Where a run's outputs are bound (device memory on a GPU, host memory on the CPU), running
//! a session with its inputs and outputs bound, and the log and counters of every host↔device
//! copy.

use super::session::Device;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{RunOptions, Session};
use ort::value::{DynTensor, DynTensorValueType};
use std::sync::Mutex;

/// Where a graph run on `device` leaves its bound outputs: GPU memory for CUDA (so latents stay
/// on the GPU between steps), host memory otherwise. (A session's default allocator is the CPU
/// one even when it runs on CUDA: binding to it would bring every output back to the host.)
pub fn output_memory(device: Device) -> ort::Result<MemoryInfo<'static>> {
    match device {
        Device::Cpu => MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Arena,
            MemoryType::Default,
        ),
        Device::Cuda => MemoryInfo::new(
            AllocationDevice::CUDA,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyDirection {
    ToDevice,
    ToHost,
}

/// Every host↔device copy the backend makes is logged (debug) and counted, so a GPU run can
/// show where they happen: `wanserve_device_copies_total{direction, what}` and
/// `wanserve_device_copy_bytes_total{direction}`.
pub(super) fn record_copy(direction: CopyDirection, what: &str, tensor: &DynTensor) {
    let dtype = tensor.dtype();
    let elements = dtype.tensor_shape().map_or(0, |shape| shape.num_elements());
    let bytes = dtype
        .tensor_type()
        .and_then(|ty| ty.byte_size(elements))
        .unwrap_or(0);
    let direction = match direction {
        CopyDirection::ToDevice => "to_device",
        CopyDirection::ToHost => "to_host",
    };
    tracing::debug!(direction, what, bytes, "host-device copy");
    metrics::counter!("wanserve_device_copies_total", "direction" => direction, "what" => what.to_string())
        .increment(1);
    metrics::counter!("wanserve_device_copy_bytes_total", "direction" => direction)
        .increment(bytes as u64);
}

/// Runs `session` (on `device`) on `inputs` with its `output` bound to [`output_memory`], under
/// `options` when given (a job's, so that a cancel can stop the run). Inputs in host memory on a
/// CUDA session are copied by ONNX Runtime: they are counted as copies.
pub(crate) fn run_on_device(
    session: &Mutex<Session>,
    device: Device,
    inputs: &[(&str, &DynTensor)],
    output: &str,
    options: Option<&RunOptions>,
) -> ort::Result<DynTensor> {
    let memory = output_memory(device)?;
    let mut session = session.lock().unwrap_or_else(|p| p.into_inner());
    let mut outputs = run_bound(&mut session, device, inputs, &[(output, &memory)], options)?;
    outputs
        .pop()
        .ok_or_else(|| ort::Error::new(format!("the graph returned no {output}")))
}

/// Runs a locked `session` on `device` with each output bound to the memory given beside it, and
/// returns the outputs in that order. Host inputs of a CUDA session and CUDA outputs bound to host
/// memory are the copies ONNX Runtime makes: each is counted.
pub(crate) fn run_bound(
    session: &mut Session,
    device: Device,
    inputs: &[(&str, &DynTensor)],
    outputs: &[(&str, &MemoryInfo<'static>)],
    options: Option<&RunOptions>,
) -> ort::Result<Vec<DynTensor>> {
    let on_host = |memory: &MemoryInfo| memory.allocation_device() == AllocationDevice::CPU;
    if device == Device::Cuda {
        for (name, tensor) in inputs {
            if on_host(tensor.memory_info()) {
                record_copy(CopyDirection::ToDevice, name, tensor);
            }
        }
    }
    let results = bind_and_run(session, inputs, outputs, options)?;
    if device == Device::Cuda {
        for ((name, memory), tensor) in outputs.iter().zip(&results) {
            if on_host(memory) {
                record_copy(CopyDirection::ToHost, name, tensor);
            }
        }
    }
    Ok(results)
}

/// [`run_bound`] without counting copies (for callers that count them under their own names).
pub(super) fn bind_and_run(
    session: &mut Session,
    inputs: &[(&str, &DynTensor)],
    outputs: &[(&str, &MemoryInfo<'static>)],
    options: Option<&RunOptions>,
) -> ort::Result<Vec<DynTensor>> {
    let mut binding = session.create_binding()?;
    for (name, tensor) in inputs {
        binding.bind_input(*name, *tensor)?;
    }
    for (name, memory) in outputs {
        binding.bind_output_to_device(*name, memory)?;
    }
    let mut values = match options {
        Some(options) => session.run_binding_with_options(&binding, options)?,
        None => session.run_binding(&binding)?,
    };
    let mut results = Vec::with_capacity(outputs.len());
    for (name, _) in outputs {
        let tensor = values
            .remove(*name)
            .ok_or_else(|| ort::Error::new(format!("the graph returned no {name}")))?
            .downcast::<DynTensorValueType>()?;
        results.push(tensor);
    }
    Ok(results)
}

/// Host memory, where outputs the host reads (a decoded video chunk) are bound.
pub(crate) fn host_memory() -> ort::Result<MemoryInfo<'static>> {
    output_memory(Device::Cpu)
}

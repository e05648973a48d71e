//! The UniPC port against values diffusers' `UniPCMultistepScheduler` printed
//! (`models/references/scheduler.json`, written by `models/reference.py`).

mod common;

use ort::value::TensorElementType;
use serde::Deserialize;
use wanserve::backend::Device;
use wanserve::backend::arithmetic::{DeviceTensor, OrtTensors};
use wanserve::model::UniPcConfig;
use wanserve::pipeline::unipc::UniPcScheduler;
use wanserve::tensor::TensorArithmetic;

#[derive(Deserialize)]
struct Reference {
    config: serde_json::Value,
    steps: usize,
    timesteps: Vec<i64>,
    sigmas: Vec<f32>,
    trajectory: Vec<Vec<f32>>,
}

fn references() -> Vec<Reference> {
    let path = common::repo_root().join("models/references/scheduler.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn timesteps_sigmas_and_trajectories_match_diffusers() {
    let refs = references();
    assert!(refs.len() >= 7);
    let mut overall = 0.0f32;
    for r in refs {
        let config: UniPcConfig = serde_json::from_value(r.config.clone()).unwrap();
        config.validate().unwrap();
        let mut scheduler = UniPcScheduler::new(&config, r.steps).unwrap();
        assert_eq!(scheduler.timesteps(), &r.timesteps[..], "{}", r.config);
        for (a, b) in scheduler.sigmas().iter().zip(&r.sigmas) {
            assert!((a - b).abs() <= 1e-7, "{}: sigma {a} vs {b}", r.config);
        }
        assert_eq!(scheduler.sigmas().len(), r.sigmas.len());
        // The same stand-in model as reference.py: 0.5·cos(sample + 0.3·i) + 0.05·i (gentle, so
        // float rounding is not amplified from step to step).
        let mut sample: Vec<f32> = (0..16).map(|i| (i as f32).sin()).collect();
        for (i, expected) in r.trajectory.iter().enumerate() {
            let output: Vec<f32> = sample
                .iter()
                .map(|x| 0.5 * (x + 0.3 * i as f32).cos() + 0.05 * i as f32)
                .collect();
            sample = scheduler.step(output, sample).unwrap();
            assert_eq!(sample.len(), expected.len(), "{} step {i}", r.config);
            let worst = sample
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "{} step {i}: differs by {worst}", r.config);
            overall = overall.max(worst);
        }
        assert!(
            scheduler.step(sample.clone(), sample.clone()).is_err(),
            "a step past the last must fail"
        );
    }
    eprintln!("UniPC vs diffusers: worst |Δ| over all configs and steps {overall:.1e}");
}

#[test]
fn unsupported_configs_are_refused() {
    let base = serde_json::json!({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                                  "use_flow_sigmas": true, "flow_shift": 3.0});
    let ok: UniPcConfig = serde_json::from_value(base.clone()).unwrap();
    ok.validate().unwrap();
    for (key, value) in [
        ("use_flow_sigmas", serde_json::json!(false)),
        ("prediction_type", serde_json::json!("epsilon")),
        ("solver_order", serde_json::json!(4)),
        ("solver_type", serde_json::json!("bh3")),
        ("use_karras_sigmas", serde_json::json!(true)),
        ("thresholding", serde_json::json!(true)),
        ("solver_type", serde_json::json!("bh1")),
    ] {
        let mut config = base.clone();
        config[key] = value;
        let config: UniPcConfig = serde_json::from_value(config).unwrap();
        assert!(config.validate().is_err(), "{key} should be refused");
    }
}

#[test]
fn zero_steps_is_an_error() {
    let config: UniPcConfig =
        serde_json::from_value(serde_json::json!({"_class_name": "UniPCMultistepScheduler",
        "prediction_type": "flow_prediction", "use_flow_sigmas": true}))
        .unwrap();
    assert!(UniPcScheduler::<Vec<f32>>::new(&config, 0).is_err());
}

/// The stand-in model of reference.py at step `i`.
fn stand_in_model(sample: &[f32], i: usize) -> Vec<f32> {
    sample
        .iter()
        .map(|x| 0.5 * (x + 0.3 * i as f32).cos() + 0.05 * i as f32)
        .collect()
}

#[test]
fn the_scheduler_runs_on_onnx_runtime_tensors_too() {
    // What a GPU backend does between steps, here on the CPU EP: every update to the sample is
    // an ORT weighted sum on tensors ORT holds; only the model's output is uploaded.
    let arithmetic = OrtTensors::new(Device::Cpu, 1, 1);
    for r in references() {
        let config: UniPcConfig = serde_json::from_value(r.config.clone()).unwrap();
        let mut on_host = UniPcScheduler::new(&config, r.steps).unwrap();
        let mut on_ort = UniPcScheduler::new(&config, r.steps).unwrap();
        let mut host_sample: Vec<f32> = (0..16).map(|i| (i as f32).sin()).collect();
        let mut ort_sample = DeviceTensor::from_host(&[16], host_sample.clone()).unwrap();
        for (i, expected) in r.trajectory.iter().enumerate() {
            let (shape, values) = ort_sample.to_host().unwrap();
            assert_eq!(shape, [16]);
            let output = DeviceTensor::from_host(&[16], stand_in_model(&values, i)).unwrap();
            ort_sample = on_ort.step_with(&arithmetic, output, ort_sample).unwrap();
            host_sample = on_host
                .step(stand_in_model(&host_sample, i), host_sample)
                .unwrap();
            let (_, values) = ort_sample.to_host().unwrap();
            assert_eq!(values.len(), host_sample.len(), "{} step {i}", r.config);
            assert_eq!(values.len(), expected.len(), "{} step {i}", r.config);
            for ((ort, host), diffusers) in values.iter().zip(&host_sample).zip(expected) {
                assert!((ort - host).abs() <= 1e-6, "{} step {i}", r.config);
                assert!((ort - diffusers).abs() <= 1e-5, "{} step {i}", r.config);
            }
        }
    }
    let a = DeviceTensor::from_host(&[16], vec![1.0; 16]).unwrap();
    let b = DeviceTensor::from_host(&[1], vec![1.0]).unwrap();
    assert!(arithmetic.weighted_sum(&[(1.0, &a), (1.0, &b)]).is_err());
}

#[test]
fn device_casts_to_bf16_round_like_the_host() {
    // bf16 transformers get their latents cast on the device; the rounding must be the host's
    // (round to nearest even), or GPU runs drift from CPU ones.
    let arithmetic = OrtTensors::new(Device::Cpu, 1, 1);
    let values: Vec<f32> = (0..4096)
        .map(|i| ((i as f32) * 0.7311).sin() * 10f32.powi(i % 7 - 3))
        .collect();
    let tensor = DeviceTensor::from_host(&[values.len()], values.clone()).unwrap();
    let down = arithmetic
        .cast(&tensor, TensorElementType::Bfloat16)
        .unwrap();
    let (_, back) = arithmetic
        .cast(&down, TensorElementType::Float32)
        .unwrap()
        .to_host()
        .unwrap();
    assert_eq!(values.len(), back.len());
    for (x, y) in values.iter().zip(&back) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *y, "{x}");
    }
}

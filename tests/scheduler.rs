//! The UniPC port against values diffusers' `UniPCMultistepScheduler` printed
//! (`models/references/scheduler.json`, written by `models/reference.py`).

mod common;

use serde::Deserialize;
use wanserve::model::SchedulerConfig;
use wanserve::pipeline::scheduler::UniPcScheduler;

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
        let config: SchedulerConfig = serde_json::from_value(r.config.clone()).unwrap();
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
            sample = scheduler.step(&output, &sample).unwrap();
            let worst = sample
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "{} step {i}: differs by {worst}", r.config);
            overall = overall.max(worst);
        }
        assert!(
            scheduler.step(&sample, &sample).is_err(),
            "a step past the last must fail"
        );
    }
    eprintln!("UniPC vs diffusers: worst |Δ| over all configs and steps {overall:.1e}");
}

#[test]
fn unsupported_configs_are_refused() {
    let base = serde_json::json!({"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                                  "use_flow_sigmas": true, "flow_shift": 3.0});
    let ok: SchedulerConfig = serde_json::from_value(base.clone()).unwrap();
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
        let config: SchedulerConfig = serde_json::from_value(config).unwrap();
        assert!(config.validate().is_err(), "{key} should be refused");
    }
}

#[test]
fn zero_steps_is_an_error() {
    let config: SchedulerConfig =
        serde_json::from_value(serde_json::json!({"_class_name": "UniPCMultistepScheduler",
        "prediction_type": "flow_prediction", "use_flow_sigmas": true}))
        .unwrap();
    assert!(UniPcScheduler::new(&config, 0).is_err());
}

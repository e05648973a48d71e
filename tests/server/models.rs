//! Several models behind one server: `--model NAME=DIR` for each, a submit's `model` picks one,
//! `GET /models` lists them, a name the server does not serve is refused naming those it does,
//! and each job runs on its own model (its video is the one that model alone makes).

use crate::common;
use crate::harness::{ALICE, Options, Server, small_job};
use serde_json::Value;
use std::path::{Path, PathBuf};

const BASE: &str = "Wan2.1-T2V-1.3B";
const WIDE: &str = "tiny-wide";

/// The second bundled model: other widths in every part (`models/tiny_wide.json`).
fn wide_model() -> PathBuf {
    common::repo_root().join("models").join("tiny-wide")
}

fn serving(models: &[(&str, &Path)]) -> Server {
    let mut extra_args = Vec::new();
    for (name, dir) in models {
        extra_args.push("--model".to_string());
        extra_args.push(format!("{name}={}", dir.display()));
    }
    Server::start(Options {
        extra_args,
        ..Options::default()
    })
}

/// The video `model` makes of the small job on `server`, as RGB frames.
fn frames(server: &Server, model: &str) -> Vec<u8> {
    let mut body = small_job();
    body["model"] = model.into();
    let id = server.submit(ALICE, &body);
    let done = server.wait_final(ALICE, &id);
    assert_eq!(done["status"], "Succeed", "{done}");
    let url = done["results"]["videos"][0]["url"].as_str().expect("url");
    let bytes = reqwest::blocking::get(url)
        .expect("video")
        .bytes()
        .expect("body");
    let dir = tempfile::tempdir().expect("temp");
    let file = dir.path().join("video.mp4");
    std::fs::write(&file, &bytes).expect("write");
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&file)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .expect("ffmpeg runs");
    assert!(out.status.success(), "{}", common::stderr(&out));
    out.stdout
}

/// Mean absolute difference of two equally long frame sequences, per byte.
fn difference(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len(), "frame sizes differ");
    let total: u64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| u64::from(x.abs_diff(*y)))
        .sum();
    total as f64 / a.len() as f64
}

#[test]
fn two_models_in_one_server_each_job_on_its_own() {
    let tiny = common::tiny_model();
    let wide = wide_model();
    let both = serving(&[(BASE, &tiny), (WIDE, &wide)]);

    let listed = both.models(ALICE);
    let models = listed["models"].as_array().expect("models");
    let names: Vec<&str> = models.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, [BASE, WIDE], "{listed}");
    assert_eq!(models[0]["default"], true);
    assert_eq!(models[1]["default"], false);
    // The tiny model: VAE scale 8 × patch 4.
    assert_eq!(models[0]["sizeMultiple"], 32, "{listed}");
    assert_eq!(
        models[0]["cacheModes"],
        serde_json::json!(["off", "fast", "faster"])
    );
    assert!(models[0]["residentMib"].as_u64().is_some(), "{listed}");
    let anonymous = both
        .client()
        .get(format!("{}/models", both.url))
        .send()
        .expect("GET /models");
    assert_eq!(
        anonymous.status(),
        401,
        "the model list needs a key like the API"
    );

    // A model the server does not serve: 422 on `model`, naming the ones it does.
    let mut body = small_job();
    body["model"] = "Wan2.2-T2V-A14B".into();
    let refused = both.post("/video/submit", Some(ALICE), &body);
    assert_eq!(refused.status(), 422);
    let refused: Value = refused.json().expect("JSON");
    assert_eq!(refused["error"]["fields"][0]["field"], "model", "{refused}");
    let reason = refused["error"]["fields"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.contains(BASE) && reason.contains(WIDE), "{reason}");

    let base_here = frames(&both, BASE);
    let wide_here = frames(&both, WIDE);
    drop(both);
    // Each alone, under the same names: the video is that model's.
    let base_alone = frames(&serving(&[(BASE, &tiny)]), BASE);
    let wide_alone = frames(&serving(&[(WIDE, &wide)]), WIDE);
    let apart = difference(&base_here, &wide_here);
    eprintln!("mean |Δ| per byte between the two models' videos: {apart:.2}");
    assert!(
        apart > 2.0,
        "the two models made the same video ({apart:.2})"
    );
    // Frame for frame what each makes alone (same seed, same bytes: RELIABILITY.md).
    assert!(
        base_here == base_alone,
        "the base model's job ran on another model"
    );
    assert!(
        wide_here == wide_alone,
        "the wide model's job ran on another model"
    );
}

/// `--model` and `--model-dir` together are refused, naming both; so is a name given twice.
#[test]
fn model_flags_that_contradict_are_refused() {
    let data = tempfile::tempdir().expect("temp dir");
    let tiny = common::tiny_model();
    let entry = format!("{BASE}={}", tiny.display());
    for (args, wanted) in [
        (
            vec![
                "--model",
                entry.as_str(),
                "--model-dir",
                tiny.to_str().expect("utf-8"),
            ],
            "not both",
        ),
        (
            vec!["--model", entry.as_str(), "--model", entry.as_str()],
            "given twice",
        ),
        (vec!["--model", "no equals sign"], "NAME=DIR"),
    ] {
        let (error, _) = crate::harness::start_refused(
            data.path(),
            |command| {
                command.args(&args);
            },
            "the server started with contradicting model flags",
        );
        assert!(
            error.contains("--model / WANSERVE_MODELS") && error.contains(wanted),
            "{args:?}: {error}"
        );
    }
}

/// A few-step distilled model beside the base one: `GET /models` says how it samples, the
/// validate plugin's per-model range lets its 3 steps through (and the seed's 20–100 stay the
/// base model's), and a 3-step job on it succeeds.
#[test]
fn a_distilled_model_serves_a_three_step_job_beside_the_base_one() {
    let temp = tempfile::tempdir().expect("temp");
    let fast = temp.path().join("fastwan");
    common::few_step_model_dir(&fast, "fastwan");
    let tiny = common::tiny_model();
    let server = Server::start(Options {
        extra_args: vec![
            "--model".into(),
            format!("{BASE}={}", tiny.display()),
            "--model".into(),
            format!("tiny-fastwan={}", fast.display()),
        ],
        toml: "[plugins.validate.config]\n\"infer_steps.tiny-fastwan\" = \"3\"\n".into(),
        ..Options::default()
    });
    let listed = server.models(ALICE);
    let few = &listed["models"][1];
    assert_eq!(few["name"], "tiny-fastwan", "{listed}");
    assert_eq!(
        (&few["sampler"], &few["steps"], &few["guidance"]),
        (&"dmd".into(), &3.into(), &false.into()),
        "{listed}"
    );
    assert_eq!(few["cacheModes"], serde_json::json!(["off"]), "{listed}");
    assert_eq!(listed["models"][0]["sampler"], "unipc");

    let job = |model: &str, steps: u32| {
        let mut body = small_job();
        body["model"] = model.into();
        body["infer_steps"] = steps.into();
        body
    };
    for (model, steps) in [("tiny-fastwan", 20), (BASE, 3)] {
        let refused = server.post("/video/submit", Some(ALICE), &job(model, steps));
        assert_eq!(refused.status(), 422, "{model} with {steps} steps");
        let refused: Value = refused.json().expect("JSON");
        assert_eq!(
            refused["error"]["fields"][0]["field"], "infer_steps",
            "{refused}"
        );
    }
    let id = server.submit(ALICE, &job("tiny-fastwan", 3));
    let done = server.wait_final(ALICE, &id);
    assert_eq!(done["status"], "Succeed", "{done}");
    assert!(
        server
            .log_line(|l| l.contains("generated") && l.contains("steps=3"))
            .is_some(),
        "the job ran 3 steps"
    );
}

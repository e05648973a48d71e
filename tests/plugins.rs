//! The plugin host with real components built from plugins/: the default validator's rules at
//! every boundary, hostile components failing closed, hot swap and rollback, `plugin check`.

mod common;

use common::{plugin_caller, plugin_wasm, plugin_wasm_wasip2, stderr, valid_submit_body, wanserve};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wanserve::plugins::{
    AdmissionAction, FinishedJob, GenerationRequest, HttpRequest, JsonValue, PluginError,
    PluginHost, PluginLimits, Principal, RetentionDecision, Slot, StoredVideo, Usage, json_fields,
};

fn host_with(slot: Slot, name: &str) -> PluginHost {
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    host.replace(
        slot,
        &std::fs::read(plugin_wasm(name)).unwrap(),
        BTreeMap::new(),
    )
    .unwrap();
    host
}

/// `body` with `changes` applied (a value `"<absent>"` removes the field).
fn with_changes(
    mut body: serde_json::Map<String, serde_json::Value>,
    changes: &serde_json::Value,
) -> serde_json::Map<String, serde_json::Value> {
    for (k, v) in changes.as_object().unwrap() {
        if v == "<absent>" {
            body.remove(k);
        } else {
            body.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Field names the validator complained about for `body` with `changes` applied.
fn errors_for(host: &PluginHost, changes: serde_json::Value) -> Vec<String> {
    let body = with_changes(valid_submit_body(), &changes);
    match host
        .validate(&plugin_caller(), &json_fields(&body))
        .expect("the plugin runs")
    {
        Ok(_) => vec![],
        Err(errors) => errors.into_iter().map(|e| e.field).collect(),
    }
}

#[test]
fn validate_seed_accepts_the_documented_example_and_normalises_it() {
    let host = host_with(Slot::Validate, "validate-seed");
    let ok = host
        .validate(&plugin_caller(), &json_fields(&valid_submit_body()))
        .unwrap()
        .unwrap();
    assert_eq!(
        (ok.width, ok.height),
        (480, 832),
        "image_size is WIDTHxHEIGHT"
    );
    assert_eq!((ok.num_frames, ok.infer_steps, ok.seed), (81, 50, 42));
    assert_eq!(ok.guidance_scale, 5.0);
    assert_eq!(ok.negative_prompt, "");
}

#[test]
fn validate_seed_boundaries() {
    let host = host_with(Slot::Validate, "validate-seed");
    let cases: Vec<(serde_json::Value, &[&str])> = vec![
        (serde_json::json!({"prompt": "123456789"}), &["prompt"]), // 9 characters
        (serde_json::json!({"prompt": "1234567890"}), &[]),        // 10
        (serde_json::json!({"prompt": "x".repeat(500)}), &[]),
        (serde_json::json!({"prompt": "x".repeat(501)}), &["prompt"]),
        // Past the plugin's initial heap (guest-alloc): memory grows, the answer is the same.
        (
            serde_json::json!({"prompt": "x".repeat(1 << 20)}),
            &["prompt"],
        ),
        (serde_json::json!({"prompt": "夕阳下的山脉金色光芒"}), &[]), // 10 characters, 30 bytes
        (
            serde_json::json!({"prompt": "夕阳下的山脉金色光"}),
            &["prompt"],
        ), // 9 characters, 27 bytes
        (serde_json::json!({"prompt": "🌅".repeat(500)}), &[]),       // 500 characters, 2000 bytes
        (serde_json::json!({"image_size": "832x480"}), &[]),
        (
            serde_json::json!({"image_size": "480X832"}),
            &["image_size"],
        ),
        (
            serde_json::json!({"image_size": "1280x720"}),
            &["image_size"],
        ),
        (serde_json::json!({"num_frames": 23}), &["num_frames"]),
        (serde_json::json!({"num_frames": 24}), &[]),
        (serde_json::json!({"num_frames": 120}), &[]),
        (serde_json::json!({"num_frames": 121}), &["num_frames"]),
        (serde_json::json!({"num_frames": 24.5}), &["num_frames"]),
        (serde_json::json!({"num_frames": 24.0}), &[]),
        (serde_json::json!({"num_frames": "24"}), &["num_frames"]),
        (
            serde_json::json!({"guidance_scale": 0.99}),
            &["guidance_scale"],
        ),
        (serde_json::json!({"guidance_scale": 1}), &[]),
        (serde_json::json!({"guidance_scale": 20.0}), &[]),
        (
            serde_json::json!({"guidance_scale": 20.01}),
            &["guidance_scale"],
        ),
        (
            serde_json::json!({"guidance_scale": "5"}),
            &["guidance_scale"],
        ),
        (serde_json::json!({"infer_steps": 19}), &["infer_steps"]),
        (serde_json::json!({"infer_steps": 20}), &[]),
        (serde_json::json!({"infer_steps": 100}), &[]),
        (serde_json::json!({"infer_steps": 101}), &["infer_steps"]),
        (serde_json::json!({"seed": -1}), &["seed"]),
        (serde_json::json!({"seed": 0}), &[]),
        (serde_json::json!({"seed": 2147483647}), &[]),
        (serde_json::json!({"seed": 2147483648u64}), &["seed"]),
        (serde_json::json!({"seed": "<absent>"}), &[]),
        (serde_json::json!({"seed": null}), &[]),
        (serde_json::json!({"negative_prompt": "x".repeat(500)}), &[]),
        (
            serde_json::json!({"negative_prompt": "x".repeat(501)}),
            &["negative_prompt"],
        ),
        (serde_json::json!({"negative_prompt": ""}), &[]),
        (serde_json::json!({"model": "Wan2.1-T2V-14B"}), &["model"]),
        (serde_json::json!({"model": "<absent>"}), &["model"]),
        (serde_json::json!({"num_frame": 24}), &["num_frame"]), // a typo is not ignored
        (serde_json::json!({"prompt": ["a list"]}), &["prompt"]),
    ];
    for (changes, expected) in cases {
        assert_eq!(errors_for(&host, changes.clone()), expected, "{changes}");
    }
}

/// On a server with several models, the seed's rules accept each served name (and no other,
/// naming them all), and a model's own `infer_steps` / `num_frames` ranges from the config
/// apply to that model alone; a range that does not read fails the self-test, naming its key.
#[test]
fn validate_seed_takes_each_models_own_ranges_from_its_config() {
    let models = ["Wan2.1-T2V-1.3B".to_string(), "tiny-fast".to_string()];
    let host = PluginHost::serving(PluginLimits::default(), &models).unwrap();
    let wasm = std::fs::read(plugin_wasm("validate-seed")).unwrap();
    let config = BTreeMap::from([
        ("infer_steps.tiny-fast".to_string(), "3-4".to_string()),
        ("num_frames.tiny-fast".to_string(), "24-49".to_string()),
    ]);
    host.replace(Slot::Validate, &wasm, config).unwrap();
    let cases: Vec<(serde_json::Value, &[&str])> = vec![
        (serde_json::json!({"infer_steps": 20}), &[]),
        (serde_json::json!({"infer_steps": 3}), &["infer_steps"]),
        (
            serde_json::json!({"model": "tiny-fast", "infer_steps": 3, "num_frames": 49}),
            &[],
        ),
        (
            serde_json::json!({"model": "tiny-fast", "infer_steps": 4, "num_frames": 24}),
            &[],
        ),
        (
            serde_json::json!({"model": "tiny-fast", "infer_steps": 5, "num_frames": 49}),
            &["infer_steps"],
        ),
        (
            serde_json::json!({"model": "tiny-fast", "infer_steps": 20, "num_frames": 49}),
            &["infer_steps"],
        ),
        (
            serde_json::json!({"model": "tiny-fast", "infer_steps": 3, "num_frames": 50}),
            &["num_frames"],
        ),
        (serde_json::json!({"num_frames": 50}), &[]),
    ];
    for (changes, expected) in cases {
        assert_eq!(errors_for(&host, changes.clone()), expected, "{changes}");
    }
    let refused = host
        .validate(
            &plugin_caller(),
            &json_fields(&with_changes(
                common::valid_submit_body(),
                &serde_json::json!({"model": "Wan2.2"}),
            )),
        )
        .unwrap()
        .unwrap_err();
    assert_eq!(
        refused[0].reason, "must be one of \"Wan2.1-T2V-1.3B\", \"tiny-fast\", got \"Wan2.2\"",
        "{refused:?}"
    );
    let bad = BTreeMap::from([("infer_steps.tiny-fast".to_string(), "four".to_string())]);
    let e = host
        .replace(Slot::Validate, &wasm, bad)
        .expect_err("a range that does not read was installed");
    assert!(e.to_string().contains("infer_steps.tiny-fast"), "{e}");
}

#[test]
fn validate_seed_reports_every_bad_field_and_draws_a_seed() {
    let host = host_with(Slot::Validate, "validate-seed");
    let body = serde_json::json!({"model": "x", "prompt": "short", "image_size": "1x1", "num_frames": 0,
        "guidance_scale": 99, "infer_steps": 0, "seed": -5, "negative_prompt": 7});
    let errors = host
        .validate(&plugin_caller(), &json_fields(body.as_object().unwrap()))
        .unwrap()
        .unwrap_err();
    let mut fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "guidance_scale",
            "image_size",
            "infer_steps",
            "model",
            "negative_prompt",
            "num_frames",
            "prompt",
            "seed"
        ]
    );
    assert!(errors.iter().all(|e| !e.reason.is_empty()));
    let empty = host.validate(&plugin_caller(), &[]).unwrap().unwrap_err();
    assert_eq!(empty.len(), 6, "six required fields: {empty:?}");

    let mut body = valid_submit_body();
    body.remove("seed");
    let seeds: Vec<u32> = (0..8)
        .map(|_| {
            host.validate(&plugin_caller(), &json_fields(&body))
                .unwrap()
                .unwrap()
                .seed
        })
        .collect();
    assert!(seeds.iter().all(|s| *s <= 2_147_483_647));
    assert!(
        seeds.windows(2).any(|w| w[0] != w[1]),
        "drawn seeds vary: {seeds:?}"
    );
}

fn assert_fails_closed_then_recovers(
    name: &str,
    body: Vec<(String, JsonValue)>,
    expect: fn(&PluginError) -> bool,
) {
    let host = PluginHost::new(PluginLimits {
        memory_bytes: 16 << 20,
        deadline: Duration::from_millis(50),
    })
    .unwrap();
    host.replace(
        Slot::Validate,
        &std::fs::read(plugin_wasm(name)).unwrap(),
        BTreeMap::new(),
    )
    .unwrap();
    for round in 0..2 {
        let started = Instant::now();
        let result = host.validate(&plugin_caller(), &body);
        let elapsed = started.elapsed();
        match &result {
            Err(e) => assert!(expect(e), "{name}: unexpected error {e}"),
            Ok(r) => panic!("{name}: must fail closed, got {r:?}"),
        }
        assert!(elapsed < Duration::from_secs(2), "{name}: took {elapsed:?}");
        assert_eq!(host.failures(Slot::Validate), round + 1);
    }
    // A good plugin swapped in works at once.
    host.replace(
        Slot::Validate,
        &std::fs::read(plugin_wasm("validate-seed")).unwrap(),
        BTreeMap::new(),
    )
    .unwrap();
    assert!(
        host.validate(&plugin_caller(), &json_fields(&valid_submit_body()))
            .unwrap()
            .is_ok()
    );
}

#[test]
fn a_plugin_that_loops_forever_is_stopped_at_its_deadline() {
    assert_fails_closed_then_recovers("test-loop", vec![], |e| {
        matches!(e, PluginError::Deadline { ms: 50, .. })
    });
}

#[test]
fn a_plugin_that_traps_fails_closed() {
    assert_fails_closed_then_recovers("test-trap", vec![], |e| {
        matches!(e, PluginError::Trapped { .. })
    });
}

#[test]
fn a_plugin_that_exhausts_memory_fails_closed() {
    let body = vec![("prompt".to_string(), JsonValue::Text("grow".into()))];
    assert_fails_closed_then_recovers("test-trap", body, |e| {
        matches!(e, PluginError::OutOfMemory { .. })
    });
}

#[test]
fn wrong_world_and_garbage_are_refused_and_leave_the_old_plugin_serving() {
    let host = host_with(Slot::Validate, "validate-seed");
    let before = host.installed(Slot::Validate).unwrap().sha256;
    let validator = std::fs::read(plugin_wasm("validate-seed")).unwrap();
    match host.replace(Slot::Auth, &validator, BTreeMap::new()) {
        Err(PluginError::WrongWorld {
            slot: Slot::Auth,
            reason,
        }) => assert!(!reason.is_empty()),
        other => panic!("expected WrongWorld, got {other:?}"),
    }
    assert!(matches!(
        host.replace(Slot::Validate, b"not wasm at all", BTreeMap::new()),
        Err(PluginError::NotAComponent(_))
    ));
    assert_eq!(host.installed(Slot::Validate).unwrap().sha256, before);
    assert!(host.installed(Slot::Auth).is_none());
}

fn job(tier: &str) -> FinishedJob {
    FinishedJob {
        request_id: "0f8b6c1e-req".into(),
        caller: Principal {
            id: "key:alice".into(),
            display_name: "alice".into(),
            attributes: vec![("tier".into(), tier.into())],
        },
        request: GenerationRequest {
            model: "Wan2.1-T2V-1.3B".into(),
            prompt: "A beautiful sunset over the mountains".into(),
            negative_prompt: String::new(),
            width: 832,
            height: 480,
            num_frames: 81,
            guidance_scale: 5.0,
            infer_steps: 50,
            seed: 42,
        },
        finished_at: 1_700_000_000_000,
        inference_seconds: 12.5,
    }
}

fn retention_host(config: &[(&str, &str)]) -> PluginHost {
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    host.replace(
        Slot::Postprocess,
        &std::fs::read(plugin_wasm("postprocess-retention")).unwrap(),
        config,
    )
    .unwrap();
    host
}

#[test]
fn hot_swap_under_concurrent_calls_loses_none_and_later_calls_see_the_new_plugin() {
    let retention = std::fs::read(plugin_wasm("postprocess-retention")).unwrap();
    let host = Arc::new(retention_host(&[]));
    let swapped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Workers that have had 10 answers: the swap waits for all three (no fixed sleep).
    let warmed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (host, swapped, warmed) = (host.clone(), swapped.clone(), warmed.clone());
            std::thread::spawn(move || {
                let (mut old, mut new, mut after_swap) = (0, 0, 0);
                while after_swap < 200 {
                    if old + new == 10 {
                        warmed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    let swap_done = swapped.load(std::sync::atomic::Ordering::SeqCst);
                    // Every call gets an answer from one complete plugin, old or new...
                    let policy = host.decide(&job("standard")).expect("no call is lost");
                    match policy.retention_seconds {
                        3600 => old += 1,
                        60 => new += 1,
                        other => panic!("answer from neither plugin: {other}"),
                    }
                    // ...and once the swap has returned, only the new one answers.
                    if swap_done {
                        assert_eq!(
                            policy.retention_seconds, 60,
                            "a call after the swap saw the old plugin"
                        );
                        after_swap += 1;
                    }
                }
                (old, new)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while warmed.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the workers never got going");
        std::thread::sleep(Duration::from_millis(1));
    }
    let config = BTreeMap::from([("retention_seconds".to_string(), "60".to_string())]);
    host.replace(Slot::Postprocess, &retention, config).unwrap();
    swapped.store(true, std::sync::atomic::Ordering::SeqCst);
    let counts: Vec<(usize, usize)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(
        counts.iter().all(|(old, _)| *old >= 10),
        "every worker's first 10 calls ran before the swap: {counts:?}"
    );
    assert_eq!(host.failures(Slot::Postprocess), 0);

    // Rollback brings the old one back, and rolling back again returns to the new one.
    host.rollback(Slot::Postprocess).unwrap();
    assert_eq!(
        host.decide(&job("standard")).unwrap().retention_seconds,
        3600
    );
    host.rollback(Slot::Postprocess).unwrap();
    assert_eq!(host.decide(&job("standard")).unwrap().retention_seconds, 60);
    let empty = PluginHost::new(PluginLimits::default()).unwrap();
    assert!(matches!(
        empty.rollback(Slot::Validate),
        Err(PluginError::NoPrevious(Slot::Validate))
    ));
}

#[test]
fn postprocess_retention_policy_and_sweeper_answers() {
    let host = retention_host(&[]);
    let policy = host.decide(&job("standard")).unwrap();
    assert_eq!(policy.object_key, "0f8b6c1e-req.mp4");
    assert_eq!(policy.retention_seconds, 3600, "one hour by default");
    assert!(policy.metadata.contains(&("seed".into(), "42".into())));
    assert!(
        policy
            .metadata
            .contains(&("caller".into(), "key:alice".into()))
    );

    let host = retention_host(&[
        ("retention_seconds", "600"),
        ("retention_seconds.premium", "86400"),
    ]);
    assert_eq!(
        host.decide(&job("standard")).unwrap().retention_seconds,
        600
    );
    assert_eq!(
        host.decide(&job("premium")).unwrap().retention_seconds,
        86400
    );

    let video = StoredVideo {
        object_key: "0f8b6c1e-req.mp4".into(),
        caller_id: "key:alice".into(),
        created_at: 1_000,
        expires_at: 2_000,
        metadata: vec![],
    };
    assert_eq!(host.retain(&video, 1_999), RetentionDecision::Keep);
    assert_eq!(host.retain(&video, 2_000), RetentionDecision::Delete);
    assert_eq!(host.retain(&video, 9_999), RetentionDecision::Delete);

    // A retention period that is not a number is refused at install.
    let bad = PluginHost::new(PluginLimits::default()).unwrap().replace(
        Slot::Postprocess,
        &std::fs::read(plugin_wasm("postprocess-retention")).unwrap(),
        BTreeMap::from([("retention_seconds".to_string(), "1h".to_string())]),
    );
    assert!(
        matches!(bad, Err(PluginError::SelfTest(ref m)) if m.contains("retention_seconds")),
        "{bad:?}"
    );
}

#[test]
fn a_failing_postprocess_plugin_keeps_videos_and_cannot_escape_the_store() {
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    let video = StoredVideo {
        object_key: "a.mp4".into(),
        caller_id: "x".into(),
        created_at: 0,
        expires_at: 1,
        metadata: vec![],
    };
    assert_eq!(
        host.retain(&video, 10),
        RetentionDecision::Keep,
        "no plugin: keep"
    );
    host.replace(
        Slot::Postprocess,
        &std::fs::read(plugin_wasm("test-bad-postprocess")).unwrap(),
        BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(
        host.retain(&video, 10),
        RetentionDecision::Keep,
        "a trapping plugin: keep"
    );
    match host.decide(&job("standard")) {
        Err(PluginError::BadResult { reason, .. }) => {
            assert!(reason.contains("safe relative path"), "{reason}")
        }
        other => panic!("expected BadResult, got {other:?}"),
    }
    assert_eq!(host.failures(Slot::Postprocess), 2);
}

#[test]
fn a_plugin_that_answers_too_much_fails_closed() {
    assert_fails_closed_then_recovers(
        "test-huge",
        vec![],
        |e| matches!(e, PluginError::BadResult { reason, .. } if reason.contains("1000 field errors")),
    );
    let body = vec![("prompt".to_string(), JsonValue::Text("long".into()))];
    assert_fails_closed_then_recovers(
        "test-huge",
        body,
        |e| matches!(e, PluginError::BadResult { reason, .. } if reason.contains("prompt")),
    );
}

#[test]
fn a_component_for_another_world_fits_no_slot() {
    let host = host_with(Slot::Validate, "validate-seed");
    let wrong = std::fs::read(plugin_wasm("test-wrong-world")).unwrap();
    for slot in Slot::ALL {
        match host.replace(slot, &wrong, BTreeMap::new()) {
            Err(PluginError::WrongWorld { slot: s, reason }) => {
                assert_eq!(s, slot);
                assert!(reason.contains("wanserve:policy"), "{reason}");
            }
            other => panic!("{slot}: expected WrongWorld, got {other:?}"),
        }
    }
    assert!(
        host.validate(&plugin_caller(), &json_fields(&valid_submit_body()))
            .unwrap()
            .is_ok()
    );
}

fn assert_admits_loopback_callers_only(host: &PluginHost) {
    let request = |peer: &str| HttpRequest {
        method: "GET".into(),
        path: "/".into(),
        headers: vec![],
        peer: peer.into(),
    };
    assert!(
        host.authenticate(&request("127.0.0.1:5000"))
            .unwrap()
            .is_ok()
    );
    assert!(host.authenticate(&request("[::1]:5000")).unwrap().is_ok());
    assert!(
        host.authenticate(&request("192.0.2.1:5000"))
            .unwrap()
            .is_err()
    );
}

fn imports_wasi(wasm: &[u8]) -> bool {
    wasm.windows(5).any(|w| w == b"wasi:")
}

#[test]
fn the_template_plugin_admits_loopback_callers_only() {
    // The default build (wasm32-unknown-unknown) imports nothing but the policy host.
    let lean = std::fs::read(plugin_wasm("plugin-template")).unwrap();
    assert!(!imports_wasi(&lean));
    assert_admits_loopback_callers_only(&host_with(Slot::Auth, "plugin-template"));

    // Built for wasm32-wasip2, Rust's std imports WASI (stdio, environment, exit): the host
    // links WASI p2, so such a component is accepted and behaves the same.
    let wasip2 = std::fs::read(plugin_wasm_wasip2("plugin-template")).unwrap();
    assert!(imports_wasi(&wasip2));
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    host.replace(Slot::Auth, &wasip2, BTreeMap::new()).unwrap();
    assert_admits_loopback_callers_only(&host);
}

#[test]
fn every_call_starts_from_a_fresh_instance() {
    // Slots are reused with their pages kept resident: nothing of one call may reach the next.
    let host = host_with(Slot::Validate, "test-trap");
    let body = vec![("prompt".to_string(), JsonValue::Text("count".into()))];
    for _ in 0..50 {
        let errors = host.validate(&plugin_caller(), &body).unwrap().unwrap_err();
        assert!(errors[0].reason.starts_with("1 "), "{}", errors[0].reason);
    }
}

#[test]
fn a_slot_deadline_applies_per_slot() {
    let host = host_with(Slot::Validate, "test-loop");
    host.set_deadline(Slot::Validate, Duration::from_millis(5));
    assert_eq!(host.deadline(Slot::Validate), Duration::from_millis(5));
    assert_eq!(host.deadline(Slot::Auth), PluginLimits::default().deadline);
    assert!(matches!(
        host.validate(&plugin_caller(), &[]),
        Err(PluginError::Deadline { ms: 5, .. })
    ));
}

#[test]
fn plugin_check_cli() {
    let ok = wanserve()
        .args(["plugin", "check", "--slot", "validate"])
        .arg(plugin_wasm("validate-seed"))
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", stderr(&ok));
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("wanserve:policy@0.1.0/validate-admission-plugin")
            && out.contains("version: wanserve:policy 0.1.0")
            && out.contains("sha256:"),
        "{out}"
    );

    let wrong = wanserve()
        .args(["plugin", "check", "--slot", "auth"])
        .arg(plugin_wasm("validate-seed"))
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let err = stderr(&wrong);
    assert!(
        err.contains("does not fit the auth slot")
            && err.lines().count() == 1
            && !err.contains("panicked"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("x.wasm");
    std::fs::write(&garbage, b"\0asm garbage").unwrap();
    let bad = wanserve()
        .args(["plugin", "check", "--slot", "validate"])
        .arg(&garbage)
        .output()
        .unwrap();
    assert!(
        !bad.status.success() && stderr(&bad).contains("not a WebAssembly component"),
        "{}",
        stderr(&bad)
    );
}

fn validate_host(config: &[(&str, &str)]) -> Result<PluginHost, PluginError> {
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    let config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    host.replace(
        Slot::Validate,
        &std::fs::read(plugin_wasm("validate-seed")).unwrap(),
        config,
    )?;
    Ok(host)
}

fn usage(queued: u32, running: u32, streams: u32, queue_limit: u32) -> Usage {
    Usage {
        jobs_queued: queued,
        jobs_running: running,
        streams_open: streams,
        queue_total: queued,
        queue_limit,
    }
}

fn caller_of_tier(tier: &str) -> Principal {
    Principal {
        id: format!("key-{tier}"),
        display_name: tier.into(),
        attributes: vec![("tier".into(), tier.into())],
    }
}

/// The default validator's admission: a quarter of the queue per caller and 16 streams unless
/// configured, per tier where a `.<tier>` value exists, a refusal that names the limit, and a
/// config that does not read refused before it serves. A validator without `admission`
/// (the plain world) admits everything.
#[test]
fn the_default_admission_bounds_each_caller_by_tier() {
    let admits = |host: &PluginHost, caller: &Principal, usage: Usage, action| {
        host.admit(caller, usage, action).expect("the plugin runs")
    };
    let assert_admission =
        |host: &PluginHost, caller: &Principal, usage: Usage, action, admitted: bool| {
            let answer = admits(host, caller, usage, action);
            assert_eq!(
                answer.is_ok(),
                admitted,
                "{action:?} at {usage:?}: {answer:?}"
            );
        };
    let standard = caller_of_tier("standard");
    let defaults = validate_host(&[]).unwrap();
    assert_admission(
        &defaults,
        &standard,
        usage(24, 2, 0, 100),
        AdmissionAction::Submit,
        true,
    );
    let busy = admits(
        &defaults,
        &standard,
        usage(25, 0, 0, 100),
        AdmissionAction::Submit,
    )
    .expect_err("a quarter of the queue is the default");
    assert!(busy.reason.contains("at most 25"), "{}", busy.reason);
    assert_eq!(busy.retry_after_seconds, None, "the host estimates it");
    // A tiny queue still lets everyone have one.
    assert_admission(
        &defaults,
        &standard,
        usage(0, 0, 0, 2),
        AdmissionAction::Submit,
        true,
    );
    assert_admission(
        &defaults,
        &standard,
        usage(1, 0, 0, 2),
        AdmissionAction::Submit,
        false,
    );
    assert_admission(
        &defaults,
        &standard,
        usage(0, 0, 15, 100),
        AdmissionAction::OpenStream,
        true,
    );
    let busy = admits(
        &defaults,
        &standard,
        usage(0, 0, 16, 100),
        AdmissionAction::OpenStream,
    )
    .expect_err("16 streams by default");
    assert_eq!(busy.retry_after_seconds, Some(10));

    let tiered = validate_host(&[
        ("max_queued", "2"),
        ("max_queued.premium", "10"),
        ("max_jobs.premium", "11"),
        ("max_streams", "1"),
        ("max_streams.premium", "4"),
        ("stream_retry_seconds", "3"),
    ])
    .unwrap();
    let premium = caller_of_tier("premium");
    assert_admission(
        &tiered,
        &standard,
        usage(2, 0, 0, 100),
        AdmissionAction::Submit,
        false,
    );
    assert_admission(
        &tiered,
        &premium,
        usage(9, 1, 0, 100),
        AdmissionAction::Submit,
        true,
    );
    let busy = admits(
        &tiered,
        &premium,
        usage(9, 2, 0, 100),
        AdmissionAction::Submit,
    )
    .expect_err("waiting and running count against max_jobs");
    assert!(busy.reason.contains("at most 11"), "{}", busy.reason);
    assert_admission(
        &tiered,
        &standard,
        usage(0, 0, 1, 100),
        AdmissionAction::OpenStream,
        false,
    );
    assert_admission(
        &tiered,
        &premium,
        usage(0, 0, 3, 100),
        AdmissionAction::OpenStream,
        true,
    );
    let busy = admits(
        &tiered,
        &premium,
        usage(0, 0, 4, 100),
        AdmissionAction::OpenStream,
    )
    .expect_err("the tier's own stream limit");
    assert_eq!(busy.retry_after_seconds, Some(3));

    // A limit that is not a number does not serve (the old config keeps serving instead).
    let broken = validate_host(&[("max_queued", "lots")])
        .err()
        .expect("refused");
    assert!(broken.to_string().contains("max_queued"), "{broken}");
    // A tier's bad value is met only when a caller of that tier comes: refused, not unbounded.
    let bad_tier = validate_host(&[("max_streams.premium", "-1")]).unwrap();
    let busy = admits(
        &bad_tier,
        &premium,
        usage(0, 0, 0, 100),
        AdmissionAction::OpenStream,
    )
    .expect_err("a broken limit refuses");
    assert!(busy.reason.contains("config is broken"), "{}", busy.reason);

    // The plain validate world has no admission: the host admits everything for it.
    let plain = host_with(Slot::Validate, "test-permissive");
    assert_admission(
        &plain,
        &standard,
        usage(1000, 0, 1000, 1),
        AdmissionAction::Submit,
        true,
    );
}

/// Plugins get time and randomness from `host` only: built for wasm32-wasip2, whose std imports
/// WASI's clocks and random source, a component still loads, but reading the wall clock, the
/// monotonic clock or the random source fails the call closed with a message naming the `host`
/// import to use, and a `HashMap`'s order (std's fixed `insecure-seed`) is the same every call.
#[test]
fn plugins_have_no_wasi_clock_or_randomness() {
    let wasm = std::fs::read(plugin_wasm_wasip2("test-hostile-auth")).unwrap();
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    host.replace(Slot::Auth, &wasm, BTreeMap::new()).unwrap();
    let ask = |host: &PluginHost, mode: &str| {
        host.authenticate(&HttpRequest {
            method: "GET".into(),
            path: "/".into(),
            headers: vec![("x-hostile".into(), mode.into())],
            peer: "127.0.0.1:5000".into(),
        })
    };
    for (mode, instead) in [
        ("wall-clock", "host.now-unix-ms"),
        ("monotonic-clock", "host.now-unix-ms"),
        ("random", "host.random-u64"),
    ] {
        match ask(&host, mode) {
            Err(PluginError::Trapped { reason, .. }) => assert!(
                reason.contains("not available to plugins") && reason.contains(instead),
                "{mode}: {reason}"
            ),
            other => panic!("{mode}: the plugin read WASI and got {other:?}"),
        }
    }
    let order = |host: &PluginHost| match ask(host, "hash-map") {
        Ok(Ok(principal)) => principal.id,
        other => panic!("hash-map: {other:?}"),
    };
    let first = order(&host);
    assert_eq!(first.split(',').count(), 32, "{first}");
    assert_eq!(
        order(&host),
        first,
        "a HashMap's order changed between calls"
    );
    let another = PluginHost::new(PluginLimits::default()).unwrap();
    another.replace(Slot::Auth, &wasm, BTreeMap::new()).unwrap();
    assert_eq!(
        order(&another),
        first,
        "a HashMap's order changed between hosts"
    );
    // What needs neither still works, in the same host.
    let plain = host.authenticate(&HttpRequest {
        method: "GET".into(),
        path: "/".into(),
        headers: vec![],
        peer: "127.0.0.1:5000".into(),
    });
    assert!(matches!(&plain, Ok(Ok(p)) if p.id == "tester"), "{plain:?}");
}

/// `wanserve plugin new` for each slot, built where a plugin author would build it: a temp
/// directory outside this repository holding only the generated files, with plain
/// `cargo build --release` (offline: the crates come from cargo's cache), then checked.
/// The validate start, as generated, is "the default rules, then mine" (see
/// `validator_keeps_the_default_answers_and_adds_its_rules`).
#[test]
fn plugin_new_builds_outside_the_repository_and_passes_check_for_every_slot() {
    let scratch = tempfile::tempdir().expect("temp dir");
    // One target directory for the three: dependencies compile once.
    let target = scratch.path().join("target");
    for slot in ["auth", "validate", "postprocess"] {
        let name = format!("my-{slot}-policy");
        let dir = scratch.path().join(&name);
        let made = wanserve()
            .args(["plugin", "new", &name, "--slot", slot, "--dir"])
            .arg(&dir)
            .output()
            .expect("plugin new runs");
        assert!(made.status.success(), "{}", stderr(&made));
        assert!(!dir.starts_with(common::repo_root().canonicalize().expect("root")));
        let built = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
            .args(["build", "--release", "--offline"])
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .output()
            .expect("cargo runs");
        assert!(built.status.success(), "{slot}: {}", stderr(&built));
        let wasm = target
            .join("wasm32-unknown-unknown/release")
            .join(format!("{}.wasm", name.replace('-', "_")));
        let checked = wanserve()
            .args(["plugin", "check", "--slot", slot])
            .arg(&wasm)
            .output()
            .expect("plugin check runs");
        let out = String::from_utf8_lossy(&checked.stdout);
        assert!(
            checked.status.success(),
            "{slot}: {}{}",
            out,
            stderr(&checked)
        );
        assert!(out.contains("self-test: passed"), "{out}");
        if slot == "validate" {
            validator_keeps_the_default_answers_and_adds_its_rules(
                &std::fs::read(&wasm).expect("component"),
            );
        }
    }
    // A directory that holds something is never written into.
    let again = wanserve()
        .args(["plugin", "new", "x", "--slot", "auth", "--dir"])
        .arg(scratch.path().join("my-auth-policy"))
        .output()
        .expect("runs");
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not empty"), "{}", stderr(&again));
}

/// A validator built on the guest library (`wanserve_policy::seed::validate`, then its own
/// rules: `banned-word`, `max-frames`) answers as the default plugin does wherever its rules do
/// not apply, on the boundary cases the seed tests send, and adds its rules' refusals.
fn validator_keeps_the_default_answers_and_adds_its_rules(custom: &[u8]) {
    let seed = host_with(Slot::Validate, "validate-seed");
    let mine = PluginHost::new(PluginLimits::default()).expect("host");
    let config = BTreeMap::from([
        ("banned-word".to_string(), "volcano".to_string()),
        ("max-frames".to_string(), "49".to_string()),
    ]);
    mine.replace(Slot::Validate, custom, config)
        .expect("installs with its config");
    let answer = |host: &PluginHost, changes: &serde_json::Value| {
        let mut body = valid_submit_body();
        body.insert("num_frames".into(), serde_json::json!(48));
        let body = with_changes(body, changes);
        match host
            .validate(&plugin_caller(), &json_fields(&body))
            .expect("runs")
        {
            Ok(request) => Ok((
                request.prompt,
                request.width,
                request.height,
                request.num_frames,
                request.infer_steps,
                request.seed,
            )),
            Err(errors) => Err(errors
                .into_iter()
                .map(|e| (e.field, e.reason))
                .collect::<Vec<_>>()),
        }
    };
    for changes in [
        serde_json::json!({}),
        serde_json::json!({"num_frames": 24}),
        serde_json::json!({"num_frames": 23}),
        serde_json::json!({"num_frames": 24.5}),
        serde_json::json!({"prompt": "too short"}),
        serde_json::json!({"prompt": "<absent>"}),
        serde_json::json!({"image_size": "640x640"}),
        serde_json::json!({"model": "other"}),
        serde_json::json!({"guidance_scale": 0.5}),
        serde_json::json!({"infer_steps": 19, "seed": -1}),
        serde_json::json!({"num_frame": 24}),
        serde_json::json!({"negative_prompt": 5}),
    ] {
        assert_eq!(
            answer(&mine, &changes),
            answer(&seed, &changes),
            "{changes}"
        );
    }
    // Its own rules, where the default accepts...
    let over = serde_json::json!({"num_frames": 50});
    assert!(answer(&seed, &over).is_ok());
    let refused = answer(&mine, &over).expect_err("over max-frames");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "num_frames", "{refused:?}");
    let banned = serde_json::json!({"prompt": "A VOLCANO erupting at dusk"});
    assert!(answer(&seed, &banned).is_ok());
    assert_eq!(answer(&mine, &banned).expect_err("banned")[0].0, "prompt");
    // ...and beside the default's refusals, all at once.
    let both = serde_json::json!({"num_frames": 121, "image_size": "1x1"});
    let fields: Vec<String> = answer(&mine, &both)
        .expect_err("both")
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(
        fields,
        ["image_size", "num_frames", "num_frames"],
        "the default's two and its own"
    );
}

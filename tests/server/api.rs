//! The seed's tables over HTTP: status codes, every parameter at and beyond its bounds, errors,
//! idempotency, principals, hostile and permissive plugins, docs, health, metrics.

use crate::common;
use crate::harness::{ADMIN, ALICE, BOB, Options, Server, small_job};
use serde_json::{Value, json};
use std::sync::OnceLock;
use std::time::Duration;

/// One server for the tests that only need requests answered (slots 1: the jobs they create are
/// cancelled at once and cost at most a step), stopped when the test binary exits.
fn shared() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        Server::start(Options {
            slots: Some(1),
            ..Options::default()
        })
        .stop_when_tests_exit()
    })
}

fn error_of(response: reqwest::blocking::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().expect("error bodies are JSON");
    assert!(
        body["error"]["code"].is_string() && body["error"]["message"].is_string(),
        "error shape: {body}"
    );
    (status, body)
}

fn bad_fields(body: &Value) -> Vec<String> {
    body["error"]["fields"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f["field"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn cancel(server: &Server, key: &str, id: &str) {
    let r = server.post("/video/cancel", Some(key), &json!({ "requestId": id }));
    assert_eq!(r.status(), 200);
}

#[test]
fn authentication_is_required_and_refusals_say_why() {
    let server = shared();
    // No key, a wrong key, a wrong scheme: 401 with a Bearer challenge, never a job.
    for (auth, what) in [
        (None, "no header"),
        (Some("Bearer wrong-key-000000"), "wrong key"),
        (Some("Basic YWxpY2U6cHc="), "wrong scheme"),
    ] {
        for path in ["/video/submit", "/video/status", "/video/cancel"] {
            let mut request = server
                .client()
                .post(format!("{}{path}", server.url))
                .json(&small_job());
            if let Some(auth) = auth {
                request = request.header("authorization", auth);
            }
            let response = request.send().expect("sent");
            let challenge = response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap_or_default().to_string());
            let (status, body) = error_of(response);
            assert_eq!(status, 401, "{what} on {path}: {body}");
            assert!(
                challenge
                    .as_deref()
                    .is_some_and(|c| c.to_ascii_lowercase().starts_with("bearer")),
                "{what}: challenge {challenge:?}"
            );
            assert!(
                !body.to_string().contains("wrong-key"),
                "a denial never echoes the credential"
            );
        }
    }
    // The cancel endpoint needs a key for DELETE too.
    let response = server
        .client()
        .delete(format!("{}/video/cancel", server.url))
        .json(&json!({"requestId": "a".repeat(32)}))
        .send()
        .expect("sent");
    assert_eq!(response.status(), 401);
}

#[test]
fn unknown_jobs_and_malformed_bodies() {
    let server = shared();
    // 404: an id nobody issued, a malformed id.
    for id in ["a".repeat(32), "../../etc/passwd".into(), String::new()] {
        for path in ["/video/status", "/video/cancel"] {
            let (status, _) = error_of(server.post(path, Some(ALICE), &json!({ "requestId": id })));
            assert_eq!(status, 404, "{path} {id:?}");
        }
    }
    // 422: requestId missing or of the wrong type.
    for body in [json!({}), json!({"requestId": 5}), json!({"id": "x"})] {
        let (status, error) = error_of(server.post("/video/status", Some(ALICE), &body));
        assert_eq!(status, 422, "{body}");
        assert_eq!(bad_fields(&error), ["requestId"]);
    }
    // 400: not JSON at all; 422: JSON but not an object.
    let response = server
        .client()
        .post(format!("{}/video/submit", server.url))
        .bearer_auth(ALICE)
        .header("content-type", "application/json")
        .body("{\"prompt\": ")
        .send()
        .expect("sent");
    let (status, body) = error_of(response);
    assert_eq!(status, 400, "{body}");
    let (status, body) = error_of(server.post("/video/submit", Some(ALICE), &json!([1, 2])));
    assert_eq!(status, 422, "{body}");
    // 413: a body over the limit (64 KiB by default).
    let mut huge = small_job();
    huge["prompt"] = json!("x".repeat(100 << 10));
    let (status, body) = error_of(server.post("/video/submit", Some(ALICE), &huge));
    assert_eq!(status, 413, "{body}");
    // Unknown routes answer in the same error shape.
    let response = server
        .client()
        .get(format!("{}/no/such/route", server.url))
        .send()
        .expect("sent");
    let (status, _) = error_of(response);
    assert_eq!(status, 404);
}

/// Every parameter of the seed's table at each bound (accepted: 202) and just beyond (422
/// naming exactly that field).
#[test]
fn every_parameter_at_and_beyond_its_bounds() {
    let server = shared();
    let with = |field: &str, value: Value| {
        let mut body = small_job();
        if value.is_null() {
            body.as_object_mut().expect("object").remove(field);
        } else {
            body[field] = value;
        }
        body
    };
    let accepted = [
        ("prompt", json!("x".repeat(10))),
        ("prompt", json!("é".repeat(500))),
        ("image_size", json!("480x832")),
        ("image_size", json!("832x480")),
        ("num_frames", json!(24)),
        ("num_frames", json!(120)),
        ("guidance_scale", json!(1.0)),
        ("guidance_scale", json!(20.0)),
        ("infer_steps", json!(20)),
        ("infer_steps", json!(100)),
        ("seed", json!(0)),
        ("seed", json!(2147483647)),
        ("seed", Value::Null),
        ("cache", json!("off")),
        ("cache", json!("fast")),
        ("cache", json!("faster")),
        ("cache", Value::Null),
    ];
    for (field, value) in accepted {
        let body = with(field, value.clone());
        let response = server.post("/video/submit", Some(ALICE), &body);
        assert_eq!(response.status(), 202, "{field} = {value} must be accepted");
        let id: Value = response.json().expect("JSON");
        let id = id["requestId"].as_str().expect("requestId").to_string();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
        let status = server.status(ALICE, &id);
        assert!(
            status["seed"].as_u64().is_some_and(|s| s <= 2147483647),
            "{status}"
        );
        if field == "seed" && !value.is_null() {
            assert_eq!(status["seed"], value);
        }
        // The mode asked for (off by default), and its plan from submit on.
        if field == "cache" {
            let mode = if value.is_null() {
                json!("off")
            } else {
                value.clone()
            };
            assert_eq!(status["cache"]["mode"], mode, "{status}");
            assert_eq!(status["cache"]["passes"], 40, "{status}");
            let skipped = status["cache"]["skippedPasses"]
                .as_u64()
                .expect("skippedPasses");
            assert_eq!(skipped == 0, mode == "off", "{status}");
        }
        cancel(server, ALICE, &id);
    }
    let refused = [
        ("prompt", json!("x".repeat(9))),
        ("prompt", json!("é".repeat(501))),
        ("prompt", Value::Null),
        ("image_size", json!("480x480")),
        ("image_size", json!("832X480 ")),
        ("image_size", Value::Null),
        ("num_frames", json!(23)),
        ("num_frames", json!(121)),
        ("num_frames", json!(24.5)),
        ("num_frames", Value::Null),
        ("guidance_scale", json!(0.99)),
        ("guidance_scale", json!(20.01)),
        ("guidance_scale", json!("5")),
        ("guidance_scale", Value::Null),
        ("infer_steps", json!(19)),
        ("infer_steps", json!(101)),
        ("infer_steps", Value::Null),
        ("seed", json!(-1)),
        ("seed", json!(2147483648u64)),
        ("model", json!("Wan2.1-T2V-14B")),
        ("cache", json!("Fast")),
        ("cache", json!("slow")),
        ("cache", json!(1)),
        ("cache", json!(true)),
    ];
    for (field, value) in refused {
        let (status, body) =
            error_of(server.post("/video/submit", Some(ALICE), &with(field, value.clone())));
        assert_eq!(status, 422, "{field} = {value}: {body}");
        assert_eq!(bad_fields(&body), [field], "{field} = {value}: {body}");
    }
    // Every bad field is listed, not just the first.
    let body = json!({"model": "Wan2.1-T2V-1.3B", "prompt": "short", "image_size": "1x1",
        "num_frames": 1, "guidance_scale": 50, "infer_steps": 1000, "cache": "everything"});
    let (status, error) = error_of(server.post("/video/submit", Some(ALICE), &body));
    assert_eq!(status, 422);
    let reason = error["error"]["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["field"] == "cache"))
        .map(|f| f["reason"].to_string())
        .unwrap_or_default();
    assert!(
        reason.contains("fast") && reason.contains("everything"),
        "the reason names the modes and what was sent: {error}"
    );
    let mut fields = bad_fields(&error);
    fields.sort();
    assert_eq!(
        fields,
        [
            "cache",
            "guidance_scale",
            "image_size",
            "infer_steps",
            "num_frames",
            "prompt"
        ]
    );
}

#[test]
fn idempotency_key_returns_the_same_job_and_creates_nothing() {
    // Its own server: the jobs it creates are counted, and no other test's jobs may count.
    let server = &Server::start(Options::default());
    let created = || {
        server
            .metrics()
            .lines()
            .find_map(|l| l.strip_prefix("wanserve_jobs_submitted_total "))
            .map_or(0, |n| n.trim().parse::<u64>().expect("a count"))
    };
    let send = |key: &str, body: &Value, idem: &str| {
        server
            .client()
            .post(format!("{}/video/submit", server.url))
            .bearer_auth(key)
            .header("idempotency-key", idem)
            .json(body)
            .send()
            .expect("sent")
    };
    let accepted = |response: reqwest::blocking::Response| -> Value {
        assert_eq!(response.status(), 202);
        response.json().expect("JSON")
    };
    let first = accepted(send(ALICE, &small_job(), "order-17"));
    let again = accepted(send(ALICE, &small_job(), "order-17"));
    assert_eq!(first["requestId"], again["requestId"]);
    assert_eq!(created(), 1, "the retry created a job");
    let id = first["requestId"].as_str().expect("id").to_string();
    // Another principal with the same key gets its own job.
    let bobs = accepted(send(BOB, &small_job(), "order-17"));
    assert_ne!(bobs["requestId"], first["requestId"]);
    assert_eq!(created(), 2);
    // The same key with another body is a conflict, not a silent second job.
    let mut other = small_job();
    other["seed"] = json!(8);
    let (status, body) = error_of(send(ALICE, &other, "order-17"));
    assert_eq!(status, 409, "{body}");
    assert_eq!(created(), 2, "the conflicting body created a job");
    // Without the header, the same body makes a new job.
    let fresh = server.submit(ALICE, &small_job());
    assert_ne!(fresh, id);
    assert_eq!(created(), 3);
    for (key, id) in [
        (ALICE, id.as_str()),
        (BOB, bobs["requestId"].as_str().expect("id")),
        (ALICE, fresh.as_str()),
    ] {
        cancel(server, key, id);
    }
    // A bad header is a field error.
    let (status, body) = error_of(send(ALICE, &small_job(), &"k".repeat(300)));
    assert_eq!(status, 422);
    assert_eq!(bad_fields(&body), ["Idempotency-Key"]);
    assert_eq!(created(), 3);
}

#[test]
fn another_principals_job_does_not_exist() {
    let server = shared();
    let id = server.submit(ALICE, &small_job());
    for path in ["/video/status", "/video/cancel"] {
        let (status, _) = error_of(server.post(path, Some(BOB), &json!({ "requestId": id })));
        assert_eq!(status, 404, "{path}");
    }
    // Bob's cancel did nothing: Alice's job is still hers to cancel.
    let status = server.status(ALICE, &id);
    assert!(
        matches!(status["status"].as_str(), Some("InQueue" | "InProgress")),
        "{status}"
    );
    cancel(server, ALICE, &id);
    assert_eq!(server.status(ALICE, &id)["status"], "Cancelled");
}

#[test]
fn a_model_that_cannot_load_is_reported_failed_by_ready() {
    // The bundled model, its manifest claiming a bf16 transformer: refused on the CPU at load.
    let model = common::tiny_model_copy();
    let manifest_path = model.path().join("wanserve-model.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest"))
            .expect("JSON");
    manifest["transformer"]["dtype"] = json!("bf16");
    std::fs::write(&manifest_path, manifest.to_string()).expect("write manifest");

    let server = Server::start(Options {
        extra_args: vec!["--model-dir".into(), model.path().display().to_string()],
        no_ready_wait: true,
        ..Options::default()
    });
    let ready = |server: &Server| {
        let response = server.get("/ready");
        (response.status(), response.json::<Value>().expect("JSON"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        let (status, body) = ready(&server);
        if body["model_state"] != "loading" || std::time::Instant::now() > deadline {
            break (status, body);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["model_state"], "failed", "{body}");
    assert_eq!(body["ready"], false, "{body}");
    let health = server
        .client()
        .get(format!("{}/health", server.url))
        .send()
        .expect("sent");
    assert_eq!(health.status(), 200);
    assert!(
        server
            .log_line(|l| l.contains("cannot load the model") && l.contains("bf16"))
            .is_some(),
        "the log says why:\n{}",
        server.log()
    );
}

#[test]
fn health_ready_docs_and_metrics() {
    let server = shared();
    let get = |path: &str| {
        server
            .client()
            .get(format!("{}{path}", server.url))
            .send()
            .expect("sent")
    };
    assert_eq!(get("/health").status(), 200);
    let ready: Value = get("/ready").json().expect("JSON");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["model_state"], "ready", "{ready}");
    let docs = get("/docs/");
    assert_eq!(docs.status(), 200);
    let html = docs.text().expect("text");
    assert!(html.contains("swagger-ui"), "Swagger UI page: {html}");
    // The UI's script comes from this server (vendored), not from a CDN.
    let script = get("/docs/swagger-ui-bundle.js");
    assert_eq!(script.status(), 200);
    assert!(script.text().expect("text").len() > 100_000);
    let spec: Value = get("/openapi.json").json().expect("JSON");
    for path in [
        "/video/submit",
        "/video/status",
        "/video/cancel",
        "/admin/plugins",
    ] {
        assert!(spec["paths"][path].is_object(), "{path} documented");
    }
    assert!(spec["paths"]["/video/cancel"]["delete"].is_object());
    // Metrics name what operators watch.
    let _ = server.post("/video/status", None, &json!({}));
    let metrics = server.metrics();
    for name in [
        "wanserve_queue_depth",
        "wanserve_jobs_running",
        "wanserve_http_requests_total",
        "wanserve_plugin_calls_total",
    ] {
        assert!(metrics.contains(name), "{name} in\n{metrics}");
    }
    // One series carries the route, the method and the status of the refused call, counted.
    let refused_status_calls = metrics
        .lines()
        .filter(|l| l.starts_with("wanserve_http_requests_total{"))
        .find(|l| {
            l.contains("route=\"/video/status\"")
                && l.contains("method=\"POST\"")
                && l.contains("status=\"401\"")
        })
        .unwrap_or_else(|| panic!("no series for the 401 on /video/status:\n{metrics}"));
    let count: f64 = refused_status_calls
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(count >= 1.0, "{refused_status_calls}");
    // A client polling with the same key: after the first call, the auth plugin's acceptance
    // is reused (`reuse-principal`), and the answer is the same.
    let poll = || {
        let (status, body) = error_of(server.post(
            "/video/status",
            Some(ALICE),
            &json!({"requestId": "c".repeat(32)}),
        ));
        assert_eq!(status, 404, "{body}");
    };
    poll();
    poll();
    assert!(
        server.metrics().contains("wanserve_auth_reused_total"),
        "{}",
        server.metrics()
    );
    // The start-up log prints the config, with its secrets redacted, and never a key.
    let log = server.log();
    assert!(log.contains("[REDACTED]"), "{log}");
    for secret in [ALICE, BOB, ADMIN] {
        assert!(!log.contains(secret), "a key in the log");
    }
    assert!(
        log.contains("RANDOM-WEIGHT"),
        "says which weights it serves"
    );
}

/// A validate plugin that loops or traps refuses the request (503), never lets it through,
/// and the next request is served; the admin API swaps plugins and rolls them back.
#[test]
fn hostile_validate_plugins_fail_closed_and_admin_swaps_them() {
    let server = Server::start(Options {
        slots: Some(1),
        ..Options::default()
    });
    let admin = |method: reqwest::Method, path: &str, key: &str, body: Vec<u8>| {
        server
            .client()
            .request(method, format!("{}{path}", server.url))
            .bearer_auth(key)
            .body(body)
            .send()
            .expect("sent")
    };
    // The admin API wants the admin key, not an API key.
    let response = admin(reqwest::Method::GET, "/admin/plugins", ALICE, vec![]);
    assert_eq!(response.status(), 401);
    let listed: Value = admin(reqwest::Method::GET, "/admin/plugins", ADMIN, vec![])
        .json()
        .expect("JSON");
    let plugins = listed["plugins"].as_array().expect("list");
    assert_eq!(plugins.len(), 3, "{listed}");
    let original = plugins
        .iter()
        .find(|p| p["slot"] == "validate")
        .expect("validate slot")["sha256"]
        .clone();
    // Not a component: refused, the old one keeps serving.
    let response = admin(
        reqwest::Method::PUT,
        "/admin/plugins/validate",
        ADMIN,
        b"not wasm".to_vec(),
    );
    assert_eq!(response.status(), 422);
    // Components of another world (one that fits no slot; the auth slot's): refused too.
    for other in ["test-wrong-world", "auth-apikey"] {
        let bytes = std::fs::read(common::plugin_wasm(other)).expect("component");
        let response = admin(
            reqwest::Method::PUT,
            "/admin/plugins/validate",
            ADMIN,
            bytes,
        );
        assert_eq!(response.status(), 422, "{other}");
    }
    let id = server.submit(ALICE, &small_job());
    cancel(&server, ALICE, &id);

    // Each misbehaviour: never returns, traps, allocates without bound ("grow"), answers too
    // much (1 000 field errors; a 1 MiB prompt for "long").
    let cases = [
        ("test-loop", None),
        ("test-trap", None),
        ("test-trap", Some("grow")),
        ("test-huge", None),
        ("test-huge", Some("long")),
    ];
    for (hostile, prompt) in cases {
        let bytes = std::fs::read(common::plugin_wasm(hostile)).expect("component");
        let response = admin(
            reqwest::Method::PUT,
            "/admin/plugins/validate",
            ADMIN,
            bytes,
        );
        assert_eq!(
            response.status(),
            200,
            "{hostile} installs (its self-test passes)"
        );
        let mut job = small_job();
        if let Some(prompt) = prompt {
            job["prompt"] = json!(prompt);
        }
        let (status, body) = error_of(server.post("/video/submit", Some(ALICE), &job));
        assert_eq!(status, 503, "{hostile} {prompt:?}: {body}");
        assert_eq!(body["error"]["code"], "plugin_unavailable");
        // Stopped at its deadline or trap: nothing of the call is left running (the server's
        // own count, not a timing), and the next request is served.
        assert_eq!(
            crate::harness::plugin_calls_running(&server, "validate"),
            0.0,
            "{hostile} {prompt:?}"
        );
        let (status, _) = error_of(server.post(
            "/video/status",
            Some(ALICE),
            &json!({"requestId": "b".repeat(32)}),
        ));
        assert_eq!(status, 404);
        let response = admin(
            reqwest::Method::POST,
            "/admin/plugins/validate/rollback",
            ADMIN,
            vec![],
        );
        assert_eq!(response.status(), 200);
        let back: Value = response.json().expect("JSON");
        assert_eq!(back["sha256"], original, "{hostile}: rolled back");
    }
    assert!(
        server
            .metrics()
            .contains("wanserve_plugin_failures_total{slot=\"validate\"} 5"),
        "{}",
        server.metrics()
    );
    // Back on validate-seed: submit works again.
    let id = server.submit(ALICE, &small_job());
    cancel(&server, ALICE, &id);
}

/// A permissive validate plugin (no ranges) cannot get a huge job past the host's limits.
#[test]
fn permissive_validate_plugin_cannot_pass_host_limits() {
    let server = Server::start(Options {
        slots: Some(1),
        toml: "[plugins.validate]\nfile = \"test_permissive.wasm\"\n".into(),
        ..Options::default()
    });
    for (body, fields) in [
        (
            json!({"image_size": "832x480", "num_frames": 4_000_000_000u64, "infer_steps": 20}),
            vec!["image_size", "num_frames"],
        ),
        (
            json!({"image_size": "4294967295x4294967295", "num_frames": 4294967295u64, "infer_steps": 20}),
            vec!["image_size", "num_frames"],
        ),
        (
            json!({"image_size": "832x480", "num_frames": 24, "infer_steps": 1_000_000}),
            vec!["infer_steps"],
        ),
        // Within the limits but off the model's 32-pixel grid.
        (
            json!({"image_size": "100x100", "num_frames": 24, "infer_steps": 20}),
            vec!["image_size"],
        ),
    ] {
        let (status, error) = error_of(server.post("/video/submit", Some(ALICE), &body));
        assert_eq!(status, 422, "{body}: {error}");
        assert_eq!(bad_fields(&error), fields, "{body}: {error}");
    }
    let counts = server.metrics();
    assert!(counts.contains("wanserve_queue_depth 0"), "{counts}");
}

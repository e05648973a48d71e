//! One auth call plus one validate call through the plugin host, as the server makes them for
//! every submitted job (each: fresh store + instance from the pre-instantiated component, the
//! call, teardown), with the default `auth-apikey` (three keys) and `validate-seed` components.
//! Target: p50 (criterion's median) of `auth_then_validate` at most 20 µs.
//! Build the components first: (cd plugins && cargo build --release)

// The server's allocator (host/src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use wanserve::plugins::api_keys::hash_key;
use wanserve::plugins::{HttpRequest, PluginHost, PluginLimits, Slot, json_fields};

fn component(name: &str) -> Vec<u8> {
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-unknown-unknown/release")
        .join(name);
    std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("{}: {e} (build plugins/ first)", wasm.display()))
}

fn plugin_calls(c: &mut Criterion) {
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    let keys = ["alice", "bob", "carol"]
        .map(|name| format!("{name}={}", hash_key(&format!("{name}-secret-key"))))
        .join(",");
    host.replace(
        Slot::Auth,
        &component("auth_apikey.wasm"),
        BTreeMap::from([("api_keys".to_string(), keys)]),
    )
    .unwrap();
    host.replace(
        Slot::Validate,
        &component("validate_seed.wasm"),
        BTreeMap::new(),
    )
    .unwrap();
    let request = HttpRequest {
        method: "POST".into(),
        path: "/video/submit".into(),
        headers: vec![
            ("authorization".into(), "Bearer carol-secret-key".into()),
            ("content-type".into(), "application/json".into()),
        ],
        peer: "203.0.113.7:40000".into(),
    };
    let body = serde_json::json!({"model": "Wan2.1-T2V-1.3B", "prompt": "A beautiful sunset over the mountains",
        "image_size": "832x480", "num_frames": 81, "guidance_scale": 5.0, "infer_steps": 50, "seed": 7});
    let fields = json_fields(body.as_object().unwrap());
    let caller = host.authenticate(&request).unwrap().unwrap();

    c.bench_function("plugin_auth_call", |b| {
        b.iter(|| black_box(host.authenticate(&request).unwrap().unwrap()))
    });
    c.bench_function("plugin_validate_call", |b| {
        b.iter(|| black_box(host.validate(&caller, &fields).unwrap().unwrap()))
    });
    c.bench_function("auth_then_validate", |b| {
        b.iter(|| {
            let caller = host.authenticate(&request).unwrap().unwrap();
            black_box(host.validate(&caller, &fields).unwrap().unwrap())
        })
    });
}

criterion_group!(benches, plugin_calls);
criterion_main!(benches);

//! One auth call plus one validate call through the plugin host, as the server makes them for
//! every submitted job (each: fresh store + instance from the pre-instantiated component, the
//! call, teardown), with the default `auth-apikey` (three keys) and `validate-seed` components.
//! Target: p50 (criterion's median) of `auth_then_validate` at most 20 µs.
//!
//! `empty_component_floor`: what any plugin call costs before the plugin does anything, a bare
//! wasmtime instantiate-and-call of an empty component (one exported no-op) with the host's
//! engine settings. Absolute microseconds drift by machine; `auth_then_validate` over twice
//! this floor does not (scripts/bench-ratios prints it).
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

fn empty_component_floor(c: &mut Criterion) {
    use wasmtime::component::{Component, Linker};
    use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(
            PoolingAllocationConfig::default(),
        ));
    let engine = Engine::new(&config).unwrap();
    let bytes = wat::parse_str(
        r#"(component
             (core module $m (func (export "run")))
             (core instance $i (instantiate $m))
             (func (export "run") (canon lift (core func $i "run"))))"#,
    )
    .unwrap();
    let component = Component::new(&engine, &bytes).unwrap();
    let pre = Linker::<()>::new(&engine)
        .instantiate_pre(&component)
        .unwrap();
    c.bench_function("empty_component_floor", |b| {
        b.iter(|| {
            let mut store = Store::new(&engine, ());
            store.set_epoch_deadline(1_000);
            let instance = pre.instantiate(&mut store).unwrap();
            let run = instance
                .get_typed_func::<(), ()>(&mut store, "run")
                .unwrap();
            run.call(&mut store, ()).unwrap();
            black_box(store)
        })
    });
}

criterion_group!(benches, plugin_calls, empty_component_floor);
criterion_main!(benches);

//! One validate call through the plugin host (fresh store + instance from the pre-instantiated
//! component, the call, teardown), with the default `validate-seed` component.
//! Build the components first: cargo build --manifest-path plugins/Cargo.toml --target wasm32-wasip2 --release

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::Path;
use wanserve::plugins::{PluginHost, PluginLimits, Principal, Slot, json_fields};

fn validate_call(c: &mut Criterion) {
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release/validate_seed.wasm");
    let bytes = std::fs::read(&wasm)
        .unwrap_or_else(|e| panic!("{}: {e} (build plugins/ first)", wasm.display()));
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    host.replace(Slot::Validate, &bytes, Default::default())
        .unwrap();
    let caller = Principal {
        id: "bench".into(),
        display_name: "Bench".into(),
        attributes: vec![],
    };
    let body = serde_json::json!({"model": "Wan2.1-T2V-1.3B", "prompt": "A beautiful sunset over the mountains",
        "image_size": "832x480", "num_frames": 81, "guidance_scale": 5.0, "infer_steps": 50, "seed": 7});
    let fields = json_fields(body.as_object().unwrap());
    c.bench_function("plugin_validate_call", |b| {
        b.iter(|| black_box(host.validate(&caller, &fields).unwrap().unwrap()))
    });
}

criterion_group!(benches, validate_call);
criterion_main!(benches);

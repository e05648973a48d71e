//! The server's costs, each against its baseline on the same machine in the same run:
//! - `status/*`: requests per second of `POST /video/status` through wanserve (auth plugin,
//!   SQLite read, JSON) against a bare axum handler returning a fixed status body, 8 concurrent
//!   connections each. Target: wanserve ≥ 0.5× bare axum.
//! - `submit`: latency of `POST /video/submit` through both plugins and the durable insert
//!   (criterion's median is the p50; p50/p99 over the run are also printed). Target p50 ≤ 2 ms.
//! - `job/*`: one tiny-model job through the server (from just before the submit request is sent
//!   to the `finishedAt` its status reports: the video published and the job `Succeed`) against
//!   the same job through the pipeline and encoder in-process (what `wanserve generate` does
//!   after loading). Target: ≤ 5 % overhead. The client polls every 250 ms only to learn that
//!   the job ended: it shares the machine's 2 cores with the server, and a poll every 10 ms
//!   measured the client's CPU as much as the server's.
//!
//! Runs the release binary (`CARGO_BIN_EXE_wanserve`): `cargo bench -p wanserve --bench server`.
//! Build the plugins first (scripts/setup does).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wanserve::backend::{Device, OrtBackend};
use wanserve::engine::render;
use wanserve::model::{ModelDir, bundled_model_dir};
use wanserve::pipeline::{CancelToken, GenerateRequest, Pipeline};
use wanserve::video::H264;

const KEY: &str = "bench-key-0123456789";
const CONCURRENCY: usize = 8;
/// How often the job bench asks for its job's status.
const POLL: Duration = Duration::from_millis(250);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Served {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_wanserve() -> Served {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wanserve"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--queue-limit",
            "100000",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("WANSERVE_API_KEYS", KEY)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("wanserve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("wanserve printed its address")
            .expect("stdout");
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !client
        .get(format!("{url}/ready"))
        .send()
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "wanserve never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    Served {
        child,
        url,
        _dir: dir,
    }
}

/// A bare axum server on its own runtime: POST /video/status → a fixed status body.
fn start_bare_axum() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/video/status",
                axum::routing::post(|_body: axum::body::Bytes| async {
                    axum::Json(json!({"requestId": "a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6",
                        "status": "InQueue", "results": {"videos": [], "timings": {"inference": null}},
                        "seed": 7, "position": 1, "expired": false}))
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(format!("http://{}", listener.local_addr().expect("addr")))
                .expect("send");
            axum::serve(listener, app).await.expect("serve");
        });
    });
    rx.recv().expect("bare server address")
}

fn small_job() -> Value {
    json!({"model": "Wan2.1-T2V-1.3B", "prompt": "A beautiful sunset over the mountains",
        "image_size": "832x480", "num_frames": 24, "guidance_scale": 5.0, "infer_steps": 20,
        "seed": 7})
}

/// Sends `total` status requests over CONCURRENCY connections; returns the wall time.
fn status_load(
    runtime: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    url: &str,
    id: &str,
    expect: u16,
    total: u64,
) -> Duration {
    let started = Instant::now();
    runtime.block_on(async {
        let per_task = total.div_ceil(CONCURRENCY as u64);
        let tasks: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let client = client.clone();
                let url = format!("{url}/video/status");
                let body = json!({ "requestId": id });
                tokio::spawn(async move {
                    for _ in 0..per_task {
                        let response = client
                            .post(&url)
                            .bearer_auth(KEY)
                            .json(&body)
                            .send()
                            .await
                            .expect("status");
                        assert_eq!(response.status(), expect);
                        let _ = response.bytes().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    });
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn server_benches(c: &mut Criterion) {
    let served = start_wanserve();
    let bare = start_bare_axum();
    let blocking = reqwest::blocking::Client::new();
    let submit = |body: &Value| -> String {
        let r = blocking
            .post(format!("{}/video/submit", served.url))
            .bearer_auth(KEY)
            .json(body)
            .send()
            .expect("submit");
        assert_eq!(r.status(), 202);
        r.json::<Value>().expect("JSON")["requestId"]
            .as_str()
            .expect("id")
            .to_string()
    };
    let cancel = |id: &str| {
        let _ = blocking
            .post(format!("{}/video/cancel", served.url))
            .bearer_auth(KEY)
            .json(&json!({ "requestId": id }))
            .send();
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = reqwest::Client::new();
    // A cancelled job: its status is one row read, like any finished job's.
    let id = submit(&small_job());
    cancel(&id);

    let mut group = c.benchmark_group("status");
    group.throughput(Throughput::Elements(1));
    group.bench_function("bare_axum", |b| {
        b.iter_custom(|n| status_load(&runtime, &client, &bare, &id, 200, n))
    });
    group.bench_function("wanserve", |b| {
        b.iter_custom(|n| status_load(&runtime, &client, &served.url, &id, 200, n))
    });
    // Where the time goes: the same request with an id that cannot exist (auth plugin, no
    // store read; 404).
    group.bench_function("wanserve_auth_only", |b| {
        b.iter_custom(|n| status_load(&runtime, &client, &served.url, "not-an-id", 404, n))
    });
    group.finish();

    let mut latencies = Vec::new();
    c.bench_function("submit", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let started = Instant::now();
                let id = submit(&small_job());
                let took = started.elapsed();
                total += took;
                latencies.push(took);
                cancel(&id);
            }
            total
        })
    });
    latencies.sort();
    if !latencies.is_empty() {
        println!(
            "submit latency over {} requests: p50 {:?}, p99 {:?}",
            latencies.len(),
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        );
    }

    // One job: in-process pipeline + encoder, then the same job through the server.
    let model = ModelDir::open(&bundled_model_dir()).expect("bundled model");
    let pipeline = Arc::new(
        Pipeline::new(
            OrtBackend::load(&model, Device::Cpu, 0).expect("sessions"),
            &model,
        )
        .expect("pipeline"),
    );
    let request = GenerateRequest {
        prompt: "A beautiful sunset over the mountains".into(),
        negative_prompt: String::new(),
        width: 832,
        height: 480,
        num_frames: 24,
        infer_steps: 20,
        guidance_scale: 5.0,
        seed: 7,
        cache: wanserve::pipeline::step_cache::CacheMode::Off,
    };
    let out = tempfile::tempdir().expect("temp");
    let mut group = c.benchmark_group("job");
    group.sample_size(10);
    group.bench_function("pipeline_in_process", |b| {
        b.iter(|| {
            let path = out.path().join("direct.mp4");
            render(
                &pipeline,
                &H264::default(),
                &request,
                &path,
                &CancelToken::default(),
                &mut |_| {},
            )
            .expect("render")
            .path
        })
    });
    group.bench_function("through_server", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let sent_ms = unix_ms();
                let id = submit(&small_job());
                let status = loop {
                    let status: Value = blocking
                        .post(format!("{}/video/status", served.url))
                        .bearer_auth(KEY)
                        .json(&json!({ "requestId": id }))
                        .send()
                        .expect("status")
                        .json()
                        .expect("JSON");
                    match status["status"].as_str() {
                        Some("Succeed") => break status,
                        Some("InQueue" | "InProgress") => std::thread::sleep(POLL),
                        other => panic!("job ended {other:?}: {status}"),
                    }
                };
                let finished_ms = status["finishedAt"].as_u64().expect("finishedAt");
                total += Duration::from_millis(finished_ms.saturating_sub(sent_ms));
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, server_benches);
criterion_main!(benches);

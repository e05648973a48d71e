//! The baseline for the status endpoint: a bare axum server (same runtime shape as wanserve's,
//! two workers) whose `POST /video/status` returns a fixed status body. Prints its URL and serves
//! until killed. `benches/server.rs` runs the same handler in-process; this one lets an external
//! load generator drive both servers alike:
//!
//! ```sh
//! cargo run --release -p wanserve --example bare_status   # prints http://127.0.0.1:PORT
//! wrk -t1 -c8 -d5s -s scripts/wrk-status.lua http://127.0.0.1:PORT/video/status
//! ```

use serde_json::json;

fn main() -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let app = axum::Router::new().route(
            "/video/status",
            axum::routing::post(|_body: axum::body::Bytes| async {
                axum::Json(json!({"requestId": "a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6",
                    "status": "InQueue", "results": {"videos": [], "timings": {"inference": null}},
                    "seed": 7, "position": 1, "expired": false, "createdAt": 1764000000000u64}))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("http://{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}

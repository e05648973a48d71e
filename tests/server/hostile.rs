//! Hostile plugins in the auth and post-process slots of a running server (the validate slot's
//! are in `api.rs`): each misbehaviour gets the documented answer, never a pass-through, the next
//! request is served at once, no video is lost, and every failure is counted in `/metrics`.

use crate::harness::{ALICE, Options, Server, plugin_calls_running, small_job};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn failures(server: &Server, slot: &str) -> u64 {
    let series = format!("wanserve_plugin_failures_total{{slot=\"{slot}\"}}");
    crate::harness::series_value(&server.metrics(), &series).map_or(0, |v| v as u64)
}

fn hostile_server() -> Server {
    Server::start(Options {
        toml: "[server]\nsweep_interval_ms = 200\n\n\
               [plugins.auth]\nfile = \"test_hostile_auth.wasm\"\n\n\
               [plugins.postprocess]\nfile = \"test_hostile_postprocess.wasm\"\n"
            .into(),
        ..Options::default()
    })
}

#[test]
fn a_hostile_auth_plugin_fails_closed_and_cannot_inject_headers() {
    let server = hostile_server();
    // Without misbehaving it lets callers in (404: no such job), which makes a 503 below the
    // plugin's failure and not a refusal.
    assert_eq!(server.status_of_no_job(None).status(), 404);
    for mode in ["loop", "trap", "grow", "huge"] {
        let before = failures(&server, "auth");
        let response = server.status_of_no_job(Some(("x-hostile", mode)));
        assert_eq!(response.status(), 503, "{mode}");
        let body: Value = response.json().expect("JSON");
        assert_eq!(
            body["error"]["code"], "plugin_unavailable",
            "{mode}: {body}"
        );
        // Stopped at its deadline: nothing of the call is left running (the server's own
        // count, not a timing), and the next request is served.
        assert_eq!(plugin_calls_running(&server, "auth"), 0.0, "{mode}");
        let started = Instant::now();
        assert_eq!(server.status_of_no_job(None).status(), 404, "after {mode}");
        eprintln!(
            "after {mode}: the next request took {:?}",
            started.elapsed()
        );
        assert_eq!(failures(&server, "auth"), before + 1, "{mode} counted");
    }
    // A challenge carrying CR/LF is not sent: the default one is, and no injected header.
    let response = server.status_of_no_job(Some(("x-hostile", "crlf")));
    assert_eq!(response.status(), 401);
    assert!(response.headers().get("set-cookie").is_none());
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        challenge.starts_with("Bearer") && !challenge.contains("session"),
        "{challenge:?}"
    );
}

#[test]
fn a_hostile_post_process_plugin_loses_no_video() {
    let server = hostile_server();
    let job = |prompt: &str| {
        let mut job = small_job();
        job["prompt"] = json!(format!("A quiet lake at dawn, {prompt}"));
        job
    };
    // Any key works with this auth plugin.
    let submit = |prompt: &str| (prompt.to_string(), server.submit(ALICE, &job(prompt)));
    let broken_decide: Vec<_> = ["decide-loop", "decide-trap", "decide-grow", "decide-huge"]
        .into_iter()
        .map(submit)
        .collect();
    let broken_retain: Vec<_> = ["retain-loop", "retain-trap", "retain-grow"]
        .into_iter()
        .map(submit)
        .collect();
    let (_, deleted) = submit("retain-delete");

    // A broken decide: the job still succeeds, under the default key and retention.
    for (what, id) in &broken_decide {
        let done = server.wait_final(ALICE, id);
        assert_eq!(done["status"], "Succeed", "{what}: {done}");
        let url = done["results"]["videos"][0]["url"].as_str().unwrap_or("");
        assert!(url.contains(&format!("/videos/{id}.mp4?")), "{what}: {url}");
        assert!(
            server
                .data_dir
                .join("videos")
                .join(format!("{id}.mp4"))
                .exists(),
            "{what}"
        );
    }
    // A broken retain: past their 1 s retention, over many sweeps, the videos stay; the control
    // that the plugin says to delete is deleted by the same sweeps.
    for (_, id) in broken_retain
        .iter()
        .chain([&(String::new(), deleted.clone())])
    {
        let done = server.wait_final(ALICE, id);
        assert_eq!(done["status"], "Succeed", "{done}");
    }
    let file = |id: &str| server.data_dir.join("videos").join(format!("{id}.mp4"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while file(&deleted).exists() {
        assert!(Instant::now() < deadline, "the control was never deleted");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(1));
    for (what, id) in &broken_retain {
        assert!(file(id).exists(), "{what}: deleted although retain failed");
        let status = server.status(ALICE, id);
        assert_eq!(status["expired"], true, "{what}: {status}");
    }
    // Every broken decide, and each broken retain at least once, counted.
    assert!(
        failures(&server, "postprocess") >= 7,
        "{}",
        server.metrics()
    );
}

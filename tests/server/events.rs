//! Live progress (`GET /video/events/{requestId}`): the events of a whole job in order, a late
//! subscriber, other principals, tokens for `EventSource`.

use crate::harness::{ALICE, BOB, Options, Server, small_job};
use reqwest::blocking::Response;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};

/// The `status` events of a stream, read until the server ends it: (id, data).
pub fn read_events(response: Response) -> Vec<(u64, Value)> {
    read_all_events(response)
        .into_iter()
        .filter(|(name, _, _)| name == "status")
        .map(|(_, id, data)| (id, data))
        .collect()
}

/// Every event of a stream, read until the server ends it: (event name, id, data).
pub fn read_all_events(response: Response) -> Vec<(String, u64, Value)> {
    assert_eq!(response.status(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut events = Vec::new();
    let (mut name, mut id, mut data) = (String::new(), None, String::new());
    for line in BufReader::new(response).lines() {
        let line = line.expect("the stream reads to its end");
        if line.is_empty() {
            // Keep-alive comments end with a blank line too: only named events count.
            if !name.is_empty() {
                let id = id.take().expect("every event has an id");
                let value = serde_json::from_str(&data).expect("JSON data");
                events.push((std::mem::take(&mut name), id, value));
            }
            data.clear();
        } else if let Some(value) = line.strip_prefix("event: ") {
            name = value.to_string();
        } else if let Some(value) = line.strip_prefix("id: ") {
            id = Some(value.parse().expect("numeric id"));
        } else if let Some(value) = line.strip_prefix("data: ") {
            data.push_str(value);
        }
    }
    events
}

/// Where a status lies in a job's life: queued, each stage of the pipeline in turn, final.
fn stage_rank(status: &Value) -> u32 {
    match status["status"].as_str() {
        Some("InQueue") => 0,
        Some("InProgress") => match status["progress"]["stage"].as_str() {
            None => 1,
            Some("encoding_text") => 2,
            Some("denoising") => 3,
            Some("decoding") => 4,
            other => panic!("unexpected stage {other:?}"),
        },
        Some("Succeed" | "Failed" | "Cancelled") => 5,
        other => panic!("unexpected status {other:?}"),
    }
}

#[test]
fn a_job_streams_in_order_to_its_end_and_only_to_its_owner() {
    let server = Server::start(Options::default());
    let id = server.submit(ALICE, &small_job());
    let url = format!("{}/video/events/{id}", server.url);
    let client = server.client();

    // Other principals and anonymous callers see nothing of it.
    let bob = client.get(&url).bearer_auth(BOB).send().expect("sent");
    assert_eq!(bob.status(), 404);
    let anonymous = client.get(&url).send().expect("sent");
    assert_eq!(anonymous.status(), 401);
    let bob_token = server.post("/video/events-token", Some(BOB), &json!({"requestId": id}));
    assert_eq!(bob_token.status(), 404);

    let all = read_all_events(client.get(&url).bearer_auth(ALICE).send().expect("sent"));
    // One id sequence over status and preview events, in the order sent.
    let ids: Vec<u64> = all.iter().map(|(_, n, _)| *n).collect();
    assert_eq!(ids, (1..=all.len() as u64).collect::<Vec<_>>());
    let events: Vec<(u64, Value)> = all
        .into_iter()
        .filter(|(name, _, _)| name == "status")
        .map(|(_, n, data)| (n, data))
        .collect();
    for pair in events.windows(2) {
        let (before, after) = (&pair[0].1, &pair[1].1);
        assert!(
            stage_rank(before) <= stage_rank(after),
            "{before} then {after}"
        );
        assert_ne!(before, after, "an event repeats the one before it");
    }
    let (_, last) = events.last().expect("events");
    assert_eq!(last["status"], "Succeed", "{last}");
    assert_eq!(last["requestId"], id.as_str());
    let video = last["results"]["videos"][0]["url"]
        .as_str()
        .expect("video URL");
    assert_eq!(
        server.client().get(video).send().expect("sent").status(),
        200
    );
    // Denoising steps as they happen, in order. The stream sends the job's state as it is when
    // it reads it after a change, so changes close together arrive as one when the reader lags
    // (on a loaded machine whole runs of steps and the start of decoding have): how many is a
    // matter of timing, so what is checked is that steps came one after another, in order,
    // while the job ran, not after it (a stream that sent only the first and last state fails).
    let steps: Vec<u64> = events
        .iter()
        .filter(|(_, s)| s["progress"]["stage"] == "denoising")
        .filter_map(|(_, s)| s["progress"]["step"].as_u64())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    let distinct = steps
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(distinct >= 3, "intermediate steps: {steps:?}");
    eprintln!("{distinct} of the 21 denoising steps (0 to 20) arrived as events of their own");

    // A late subscriber with a token (what a browser's EventSource uses): the final state, then
    // the end. A token altered by one character opens nothing.
    let minted = server.mint_events_token(ALICE, &id);
    let token = minted["token"].as_str().expect("token");
    assert_eq!(minted["expiresIn"], 300);
    let late = read_events(
        client
            .get(format!("{url}?token={token}"))
            .send()
            .expect("sent"),
    );
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].1["status"], "Succeed");
    let altered = crate::harness::with_last_char_altered(token);
    let refused = client
        .get(format!("{url}?token={altered}"))
        .send()
        .expect("sent");
    assert_eq!(refused.status(), 401);
    // A token for one job opens no other.
    let other = server.submit(ALICE, &small_job());
    let elsewhere = client
        .get(format!("{}/video/events/{other}?token={token}", server.url))
        .send()
        .expect("sent");
    assert_eq!(elsewhere.status(), 404);
}

#[test]
fn an_open_stream_does_not_hold_up_shutdown() {
    let mut server = Server::start(Options {
        slots: Some(1),
        ..Options::default()
    });
    // Two long jobs on one slot: the second stays queued, so its stream has no end in sight.
    let _running = server.submit(ALICE, &crate::harness::long_job());
    let queued = server.submit(ALICE, &crate::harness::long_job());
    let stream = server
        .client()
        .get(format!("{}/video/events/{queued}", server.url))
        .bearer_auth(ALICE)
        .send()
        .expect("sent");
    let reader = std::thread::spawn(move || read_events(stream));
    std::thread::sleep(std::time::Duration::from_millis(500));
    // `terminate` fails the test if the server has not exited 60 s after SIGTERM.
    assert!(server.terminate().success());
    let events = reader.join().expect("the stream ended");
    assert_eq!(events[0].1["status"], "InQueue", "{events:?}");
}

/// The pixel size of a PNG (its IHDR), checking the signature.
fn png_size(data_url: &str) -> (u32, u32) {
    use base64::Engine;
    let encoded = data_url
        .strip_prefix("data:image/png;base64,")
        .unwrap_or_else(|| panic!("a PNG data URL: {}", &data_url[..data_url.len().min(40)]));
    let png = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let reader = decoder.read_info().expect("a PNG that decodes");
    let info = reader.info();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    (info.width, info.height)
}

#[test]
fn previews_stream_in_order_while_a_job_runs_and_stop_at_its_end() {
    // A preview after every step of a 50-step job.
    let server = Server::start(Options {
        extra_args: vec!["--preview-every".into(), "1".into()],
        ..Options::default()
    });
    let models = server.models(ALICE);
    assert_eq!(models["models"][0]["previewEvery"], 1, "{models}");
    let mut job = small_job();
    job["infer_steps"] = json!(50);
    let id = server.submit(ALICE, &job);
    let url = format!("{}/video/events/{id}", server.url);
    let stream = server
        .client()
        .get(&url)
        .bearer_auth(ALICE)
        .send()
        .expect("sent");
    // Status polling stays as it was: no picture in it while the job runs.
    let polled = std::thread::spawn({
        let (client, base, id) = (server.client().clone(), server.url.clone(), id.clone());
        move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                let status: Value = client
                    .post(format!("{base}/video/status"))
                    .bearer_auth(ALICE)
                    .json(&json!({"requestId": id}))
                    .send()
                    .expect("sent")
                    .json()
                    .expect("JSON");
                if status["progress"]["stage"] == "denoising" {
                    return status;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            panic!("never saw the job denoising");
        }
    });
    let events = read_all_events(stream);
    let running = polled.join().expect("polled");
    assert!(
        !running.to_string().contains("image/png") && running.get("preview").is_none(),
        "{running}"
    );

    let (last_name, _, last) = events.last().expect("events");
    assert_eq!(
        (last_name.as_str(), &last["status"]),
        ("status", &json!("Succeed"))
    );
    let mut last_step = 0;
    let mut previews = Vec::new();
    for (name, _, data) in &events {
        match name.as_str() {
            "status" => match data["progress"]["stage"].as_str() {
                Some("denoising") => last_step = data["progress"]["step"].as_u64().expect("step"),
                Some("decoding") => last_step = u64::MAX,
                _ => {}
            },
            "preview" => {
                assert_eq!(data["requestId"], id.as_str());
                assert_eq!(data["total"], 50);
                let step = data["step"].as_u64().expect("step");
                assert!(
                    step <= last_step,
                    "preview of step {step} before its status ({last_step})"
                );
                // 832x480 through a VAE that divides by 8: 104x60.
                assert_eq!(
                    (data["width"].as_u64(), data["height"].as_u64()),
                    (Some(104), Some(60))
                );
                let image = data["image"].as_str().expect("image");
                assert_eq!(png_size(image), (104, 60));
                previews.push(step);
            }
            other => panic!("unexpected event {other}"),
        }
    }
    assert!(
        previews.windows(2).all(|w| w[0] < w[1]),
        "previews in step order: {previews:?}"
    );
    assert!(
        previews.len() >= 5,
        "previews as the job runs: {previews:?}"
    );
    // None after the final status, and a late subscriber gets only that status.
    let late = read_all_events(
        server
            .client()
            .get(&url)
            .bearer_auth(ALICE)
            .send()
            .expect("sent"),
    );
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].0, "status");

    // Previews off: the model list says so and a stream carries none.
    let quiet = Server::start(Options {
        extra_args: vec!["--preview-every".into(), "0".into()],
        ..Options::default()
    });
    let models = quiet.models(ALICE);
    assert!(
        models["models"][0].get("previewEvery").is_none(),
        "{models}"
    );
    let id = quiet.submit(ALICE, &small_job());
    let events = read_all_events(
        quiet
            .client()
            .get(format!("{}/video/events/{id}", quiet.url))
            .bearer_auth(ALICE)
            .send()
            .expect("sent"),
    );
    assert!(
        events.iter().all(|(name, _, _)| name == "status"),
        "{events:?}"
    );
    assert_eq!(events.last().expect("events").2["status"], "Succeed");
}

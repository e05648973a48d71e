//! Live progress (`GET /video/events/{requestId}`): the events of a whole job in order, a late
//! subscriber, other principals, tokens for `EventSource`.

use crate::harness::{ALICE, BOB, Options, Server, small_job};
use reqwest::blocking::Response;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};

/// The `status` events of a stream, read until the server ends it: (id, data).
pub fn read_events(response: Response) -> Vec<(u64, Value)> {
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
            if name == "status" {
                let id = id.take().expect("every event has an id");
                events.push((id, serde_json::from_str(&data).expect("JSON data")));
            }
            (name, data) = (String::new(), String::new());
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

    let events = read_events(client.get(&url).bearer_auth(ALICE).send().expect("sent"));
    let ids: Vec<u64> = events.iter().map(|(n, _)| *n).collect();
    assert_eq!(ids, (1..=events.len() as u64).collect::<Vec<_>>());
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
    // it re-reads it, so changes close together can arrive as one (on a loaded machine step 20
    // and the start of decoding have): most steps, not necessarily every one.
    let steps: Vec<u64> = events
        .iter()
        .filter(|(_, s)| s["progress"]["stage"] == "denoising")
        .filter_map(|(_, s)| s["progress"]["step"].as_u64())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert!(
        steps.last().is_some_and(|&last| last >= 15),
        "denoising seen to its end, or close: {steps:?}"
    );
    let distinct = steps
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert!(distinct >= 10, "one event per step, or close: {steps:?}");

    // A late subscriber with a token (what a browser's EventSource uses): the final state, then
    // the end. A token altered by one character opens nothing.
    let minted: Value = server
        .post(
            "/video/events-token",
            Some(ALICE),
            &json!({"requestId": id}),
        )
        .json()
        .expect("JSON");
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
    let mut altered = token.to_string();
    let flipped = if altered.ends_with('A') { "B" } else { "A" };
    altered.replace_range(altered.len() - 1.., flipped);
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

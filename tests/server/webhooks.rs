//! Webhooks: a receiver on loopback (allowed by the server's config) gets the final status only,
//! signed, retried with the same id until it answers 2xx; targets the server must not call are
//! refused at submit.

use crate::harness::{ALICE, Options, Server, long_job, small_job};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

struct Received {
    /// The request line's target: a path, or an absolute URL when sent to a proxy.
    target: String,
    headers: HashMap<String, String>,
    body: String,
    answered: u16,
}

/// An HTTP receiver on a free loopback port that answers its requests with `answers` in order
/// (204 after them) and keeps what it got.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(answers: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/hooks/video",
            listener.local_addr().expect("addr")
        );
        let got = Arc::new(Mutex::new(Vec::new()));
        let answers = answers.to_vec();
        let kept = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut headers = HashMap::new();
                let mut line = String::new();
                reader.read_line(&mut line).expect("request line");
                let target = line.split(' ').nth(1).unwrap_or_default().to_string();
                loop {
                    line.clear();
                    reader.read_line(&mut line).expect("header");
                    let Some((name, value)) = line.trim_end().split_once(':') else {
                        break;
                    };
                    headers.insert(name.to_ascii_lowercase(), value.trim().to_string());
                }
                let length: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; length];
                reader.read_exact(&mut body).expect("body");
                let mut got = kept.lock().expect("lock");
                let answered = answers.get(got.len()).copied().unwrap_or(204);
                got.push(Received {
                    target,
                    headers,
                    body: String::from_utf8(body).expect("utf-8 body"),
                    answered,
                });
                let _ = write!(
                    stream,
                    "HTTP/1.1 {answered} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Receiver { url, got }
    }

    /// Waits until a request was answered 2xx, then a little longer (nothing more may come).
    fn wait_delivered(&self) {
        let started = Instant::now();
        while !self
            .got
            .lock()
            .expect("lock")
            .iter()
            .any(|r| r.answered < 300)
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no delivery in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(1500));
    }
}

/// Verifies a request the Standard Webhooks way and returns its body as JSON.
fn verified(received: &Received) -> Value {
    let header = |name: &str| {
        received
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .clone()
    };
    let (id, timestamp) = (header("webhook-id"), header("webhook-timestamp"));
    let sent_at: i64 = timestamp.parse().expect("a Unix timestamp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (now - sent_at).abs() < 120,
        "timestamp {sent_at}, now {now}"
    );
    let key = STANDARD
        .decode(SECRET.strip_prefix("whsec_").expect("prefix"))
        .expect("base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{timestamp}.{}", received.body).as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    assert!(
        header("webhook-signature")
            .split(' ')
            .any(|s| s == expected),
        "signature does not verify"
    );
    assert_eq!(header("content-type"), "application/json");
    serde_json::from_str(&received.body).expect("a JSON body")
}

fn webhook_server() -> Server {
    webhook_server_with(vec![], vec![])
}

fn webhook_server_with(extra_args: Vec<String>, env: Vec<(String, String)>) -> Server {
    Server::start(Options {
        slots: Some(1),
        extra_args: [
            "--webhook-allow",
            "127.0.0.1/32",
            "--webhook-first-retry-ms",
            "200",
        ]
        .into_iter()
        .map(String::from)
        .chain(extra_args)
        .collect(),
        env: [("WANSERVE_WEBHOOK_SECRET".to_string(), SECRET.to_string())]
            .into_iter()
            .chain(env)
            .collect(),
        ..Options::default()
    })
}

fn with_webhook(mut job: Value, url: &str) -> Value {
    job["webhook"] = json!(url);
    job
}

#[test]
fn the_final_status_arrives_signed_and_retries_keep_their_id() {
    let server = webhook_server();
    // Fails twice (a 500, then a 404), takes the third.
    let flaky = Receiver::start(&[500, 404]);
    let id = server.submit(ALICE, &with_webhook(small_job(), &flaky.url));
    // A queued job cancelled before it ran: its webhook says so, once.
    let blocker = server.submit(ALICE, &long_job());
    let steady = Receiver::start(&[]);
    let cancelled = server.submit(ALICE, &with_webhook(small_job(), &steady.url));
    let response = server.post(
        "/video/cancel",
        Some(ALICE),
        &json!({"requestId": cancelled}),
    );
    assert_eq!(response.status(), 200);
    let response = server.post("/video/cancel", Some(ALICE), &json!({"requestId": blocker}));
    assert_eq!(response.status(), 200);

    let done = server.wait_final(ALICE, &id);
    assert_eq!(done["status"], "Succeed", "{done}");
    flaky.wait_delivered();
    let got = flaky.got.lock().expect("lock");
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 404, 204],
        "delivered on the third try, and only once"
    );
    let ids: Vec<&String> = got.iter().map(|r| &r.headers["webhook-id"]).collect();
    assert!(ids[0].starts_with("msg_"), "{ids:?}");
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one id for every try: {ids:?}"
    );
    assert!(
        got.iter().all(|r| r.body == got[0].body),
        "the same body each time"
    );
    let event = verified(&got[2]);
    assert_eq!(event["type"], "video.succeeded", "{event}");
    assert_eq!(event["data"]["requestId"], id.as_str());
    assert_eq!(event["data"]["status"], "Succeed");
    let url = event["data"]["results"]["videos"][0]["url"]
        .as_str()
        .expect("the video URL");
    let video = server.client().get(url).send().expect("download");
    assert_eq!(
        video.status(),
        200,
        "the URL in the webhook works without a key"
    );
    // Recorded on the job.
    let status = server.status(ALICE, &id);
    assert_eq!(status["webhook"]["id"], ids[0].as_str(), "{status}");
    assert_eq!(status["webhook"]["state"], "delivered");
    assert_eq!(status["webhook"]["attempts"], 3);
    assert!(
        status["webhook"]["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("404")),
        "{status}"
    );

    steady.wait_delivered();
    let got = steady.got.lock().expect("lock");
    assert_eq!(got.len(), 1, "one request for one final state");
    let event = verified(&got[0]);
    assert_eq!(event["type"], "video.cancelled", "{event}");
    assert_eq!(event["data"]["requestId"], cancelled.as_str());
}

#[test]
fn targets_the_server_must_not_call_are_refused_at_submit() {
    let server = webhook_server();
    for (webhook, says) in [
        (json!("http://10.0.0.1/hook"), "internal"),
        (json!("http://127.0.0.2:8080/hook"), "internal"),
        (json!("http://[::1]/hook"), "internal"),
        // NAT64's local-use prefix (RFC 8215), here carrying 10.0.0.1.
        (json!("http://[64:ff9b:1::a00:1]/hook"), "internal"),
        (json!("http://169.254.169.254/latest/meta-data"), "internal"),
        (json!("file:///etc/passwd"), "http or https"),
        (json!(42), "must be a string"),
    ] {
        let mut job = small_job();
        job["webhook"] = webhook.clone();
        let response = server.post("/video/submit", Some(ALICE), &job);
        assert_eq!(response.status(), 422, "{webhook}");
        let body: Value = response.json().expect("JSON");
        let fields = body["error"]["fields"].as_array().expect("fields");
        assert_eq!(fields.len(), 1, "{body}");
        assert_eq!(fields[0]["field"], "webhook");
        assert!(
            fields[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(says)),
            "{webhook}: {body}"
        );
    }
    // With another bad field, both are reported.
    let mut job = small_job();
    job["webhook"] = json!("http://10.0.0.1/hook");
    job["num_frames"] = json!(500);
    let body: Value = server
        .post("/video/submit", Some(ALICE), &job)
        .json()
        .expect("JSON");
    let mut named: Vec<&str> = body["error"]["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter_map(|f| f["field"].as_str())
        .collect();
    named.sort();
    assert_eq!(named, ["num_frames", "webhook"], "{body}");
    // None of them became a job.
    let metrics = server.metrics();
    assert!(metrics.contains("wanserve_queue_depth 0"), "{metrics}");
    assert!(metrics.contains("wanserve_jobs_running 0"), "{metrics}");
}

#[test]
fn proxies_come_from_the_operator_never_from_the_environment() {
    // A dead proxy in every variable reqwest would read: deliveries go direct regardless.
    let dead = "http://127.0.0.1:9".to_string();
    let env = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .map(|name| (name.to_string(), dead.clone()))
    .to_vec();
    let direct = Receiver::start(&[]);
    let server = webhook_server_with(vec![], env.clone());
    let id = server.submit(ALICE, &with_webhook(small_job(), &direct.url));
    direct.wait_delivered();
    let got = direct.got.lock().expect("lock");
    assert_eq!(got.len(), 1, "delivered once, directly");
    assert_eq!(got[0].target, "/hooks/video", "not a proxy request");
    assert_eq!(verified(&got[0])["data"]["requestId"], id.as_str());
    drop(got);
    drop(server);

    // --webhook-proxy: every delivery goes to the operator's proxy (here the receiver, which
    // sees the proxy form of the request), and the target is still checked at submit.
    let proxy = Receiver::start(&[]);
    let proxy_url = proxy.url.trim_end_matches("/hooks/video").to_string();
    let server = webhook_server_with(vec!["--webhook-proxy".into(), proxy_url], env);
    let target = direct.url.replace("/hooks/video", "/through-proxy");
    let id = server.submit(ALICE, &with_webhook(small_job(), &target));
    proxy.wait_delivered();
    let got = proxy.got.lock().expect("lock");
    assert_eq!(
        got.len(),
        1,
        "{:?}",
        got.iter().map(|r| &r.target).collect::<Vec<_>>()
    );
    assert_eq!(got[0].target, target, "the proxy gets the absolute target");
    assert_eq!(verified(&got[0])["data"]["requestId"], id.as_str());
    let mut job = small_job();
    job["webhook"] = json!("http://10.0.0.1/hook");
    assert_eq!(
        server.post("/video/submit", Some(ALICE), &job).status(),
        422,
        "a proxy does not open internal targets"
    );
}

//! Abuse over HTTP: credentials of every wrong shape (refused, none of them logged), video URLs
//! that try to leave the store, bodies past the limit, clients that trickle their headers, and a
//! thousand submits at once against a small queue.

use crate::common::jwt::{b64, claims, fixture, hs256, rs256, unsigned};
use crate::harness::{
    ADMIN, ALICE, BOB, Options, Server, long_job, raw_get, raw_request, small_job,
};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The sum of `wanserve_http_requests_total` over the series with this route and status.
fn requests_counted(metrics: &str, route: &str, status: u16) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("wanserve_http_requests_total{"))
        .filter(|l| l.contains(&format!("route=\"{route}\"")))
        .filter(|l| l.contains(&format!("status=\"{status}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn every_wrong_credential_is_refused_and_none_is_logged() {
    let public = fixture("rsa-public.pem");
    let private = fixture("rsa-private.pem");
    let server = Server::start(Options {
        toml: format!(
            "[plugins.auth.config]\njwt_algorithm = \"RS256\"\njwt_key = '''\n{public}'''\n"
        ),
        // Everything the HTTP layers and the server have to say.
        env: vec![(
            "RUST_LOG".into(),
            "info,wanserve=trace,hyper=trace,axum=trace,tower_http=trace".into(),
        )],
        ..Options::default()
    });

    let valid_jwt = rs256(&claims("svc", 600, json!({})), &private);
    let mut parts = valid_jwt.splitn(3, '.');
    let (header, _, signature) = (
        parts.next().expect("header"),
        parts.next().expect("payload"),
        parts.next().expect("signature"),
    );
    let admin_claims = claims("admin", 600, json!({}));
    let mut last_byte_differs = ALICE.to_string();
    let last = last_byte_differs.pop().expect("a key");
    last_byte_differs.push(if last == '0' { '1' } else { '0' });
    let refused: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        (
            "another scheme",
            Some(format!("Basic {}", b64(&format!("alice:{ALICE}")))),
        ),
        ("a scheme and no token", Some("Bearer".into())),
        ("an empty token", Some("Bearer ".into())),
        (
            "a key differing in its last byte",
            Some(format!("Bearer {last_byte_differs}")),
        ),
        ("a key with a byte more", Some(format!("Bearer {ALICE}0"))),
        (
            "a key a byte short",
            Some(format!("Bearer {}", &ALICE[..ALICE.len() - 1])),
        ),
        (
            "a JWT signed by an untrusted key",
            Some(format!(
                "Bearer {}",
                rs256(&admin_claims, &fixture("other-rsa-private.pem"))
            )),
        ),
        (
            "an expired JWT",
            Some(format!(
                "Bearer {}",
                rs256(&claims("svc", -120, json!({})), &private)
            )),
        ),
        (
            "alg none",
            Some(format!("Bearer {}", unsigned(&admin_claims))),
        ),
        (
            "alg none carrying a valid signature",
            Some(format!("Bearer {}{signature}", unsigned(&admin_claims))),
        ),
        (
            "HS256 keyed with the server's public key",
            Some(format!("Bearer {}", hs256(&admin_claims, &public))),
        ),
        (
            "other claims under a valid signature",
            Some(format!(
                "Bearer {header}.{}.{signature}",
                b64(&admin_claims.to_string())
            )),
        ),
    ];
    let before = requests_counted(&server.metrics(), "/video/status", 401);
    for (what, authorization) in &refused {
        let response =
            server.status_of_no_job(authorization.as_deref().map(|a| ("authorization", a)));
        let status = response.status().as_u16();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let body = response.text().expect("body");
        assert_eq!(status, 401, "{what}: {body}");
        assert!(challenge.starts_with("bearer"), "{what}: {challenge:?}");
        let error: Value = serde_json::from_str(&body).expect("JSON error");
        assert!(error["error"]["message"].is_string(), "{what}: {body}");
        if let Some(token) = authorization.as_deref().and_then(|a| a.split(' ').nth(1))
            && token.len() > 4
        {
            assert!(!body.contains(token), "{what}: the token came back");
        }
    }
    let counted = requests_counted(&server.metrics(), "/video/status", 401) - before;
    assert_eq!(counted, refused.len() as u64, "each refusal is counted");

    // A 1 MiB token: refused (by hyper's header limit or the plugin), and the server goes on.
    // The server may close the connection while the client is still sending: that is a
    // refusal too.
    let huge = format!("Bearer {}", "wanserve-abuse-".repeat(70_000));
    let answer = server
        .client()
        .post(format!("{}/video/status", server.url))
        .header("authorization", &huge)
        .json(&json!({"requestId": "a".repeat(32)}))
        .send();
    if let Ok(response) = answer {
        let status = response.status().as_u16();
        assert!(matches!(status, 401 | 431), "1 MiB token: {status}");
    }

    // What does get in, for contrast: the key itself and a valid JWT (404: no such job).
    for (what, authorization) in [
        ("the key", format!("Bearer {ALICE}")),
        ("a valid JWT", format!("Bearer {valid_jwt}")),
    ] {
        let status = server
            .status_of_no_job(Some(("authorization", &authorization)))
            .status();
        assert_eq!(status, 404, "{what} is accepted");
    }

    // The log says what was refused, where and why, and holds none of what was presented.
    let refusal = server
        .log_line(|l| l.contains("request refused: not authenticated"))
        .expect("refusals are logged");
    assert!(refusal.contains("/video/status"), "{refusal}");
    let log = server.log();
    assert!(
        log.contains("the token's algorithm is not accepted")
            && log.contains("the token has expired"),
        "the reasons are logged"
    );
    let mut secrets: Vec<String> = vec![ALICE.into(), BOB.into(), valid_jwt.clone()];
    secrets.extend(
        refused
            .iter()
            .filter_map(|(_, a)| a.as_deref()?.split(' ').nth(1))
            .filter(|token| token.len() > 4)
            .map(String::from),
    );
    secrets.push("wanserve-abuse-wanserve-abuse-".into());
    for secret in &secrets {
        // A JWT's signature alone is enough to replay it.
        let tail = &secret[secret.len().saturating_sub(24)..];
        assert!(!log.contains(tail), "a credential reached the log: {tail}");
    }
}

fn sign_video_url(secret: &[u8], key: &str, expires: i64) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(format!("GET\n{key}\n{expires}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// `%XX` decoding, as the router decodes a path segment before the handler sees it.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn video_urls_serve_nothing_outside_the_store() {
    let server = Server::start(Options::default());
    let alice = server.submit(ALICE, &small_job());
    let bob = server.submit(BOB, &small_job());
    let url_of = |key: &str, id: &str| {
        let done = server.wait_final(key, id);
        assert_eq!(done["status"], "Succeed", "{done}");
        done["results"]["videos"][0]["url"]
            .as_str()
            .expect("url")
            .to_string()
    };
    let (alice_url, bob_url) = (url_of(ALICE, &alice), url_of(BOB, &bob));
    // Canaries beside and above the store: nothing below may ever return them.
    let canary = "CANARY-wanserve-must-not-serve-this";
    std::fs::write(server.data_dir.join("canary.txt"), canary).expect("canary");
    std::fs::write(server.data_dir.join("../canary.txt"), canary).expect("canary");
    let secret = std::fs::read(server.data_dir.join("url-secret")).expect("the URL secret");

    let target = |url: &str| url.trim_start_matches(&server.url).to_string();
    let (path, query) = alice_url
        .trim_start_matches(&server.url)
        .split_once('?')
        .map(|(p, q)| (p.to_string(), q.to_string()))
        .expect("a signed URL");
    let key = path.trim_start_matches("/videos/").to_string();
    let expires: i64 = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("expires="))
        .and_then(|e| e.parse().ok())
        .expect("expires");

    // Control: the URL as given serves the video.
    let (status, body) = raw_get(&server.url, &target(&alice_url));
    assert_eq!(status, 200);
    assert!(body.contains("ftyp"), "an mp4");

    let refused = |what: &str, target: &str| {
        let (status, body) = raw_get(&server.url, target);
        assert!(
            matches!(status, 400 | 403 | 404),
            "{what}: {target} answered {status}"
        );
        assert!(!body.contains(canary) && !body.contains("ftyp"), "{what}");
        assert!(
            !body.contains("[server]") && !body.contains("root:"),
            "{what}: {target} served a file"
        );
    };
    let hostile_keys = [
        "../canary.txt",
        "../../canary.txt",
        "%2e%2e/canary.txt",
        "%2e%2e%2fcanary.txt",
        "..%2f..%2fcanary.txt",
        "%2e%2e%2f%2e%2e%2fcanary.txt",
        "..%5ccanary.txt",
        "..\\canary.txt",
        "%252e%252e%252fcanary.txt",
        "/etc/passwd",
        "%2fetc%2fpasswd",
        "..%00/canary.txt",
        "./../canary.txt",
        "url-secret",
        "../url-secret",
        "../wanserve.toml",
    ];
    let far = expires + 3600;
    for hostile in hostile_keys {
        let with_key = format!("{path}/../{hostile}");
        // With the real URL's signature, and with a valid signature over exactly the key the
        // server decodes: what matters is the path, not whether someone could sign it.
        refused(hostile, &format!("/videos/{hostile}?{query}"));
        refused(hostile, &format!("{with_key}?{query}"));
        let signed = sign_video_url(&secret, &percent_decoded(hostile), far);
        refused(
            hostile,
            &format!("/videos/{hostile}?expires={far}&sig={signed}"),
        );
    }

    // Another job's key with this job's signature; the signature or expiry altered; expired.
    let bob_key = bob_url
        .trim_start_matches(&server.url)
        .split_once('?')
        .expect("signed")
        .0
        .trim_start_matches("/videos/")
        .to_string();
    refused("another job's key", &format!("/videos/{bob_key}?{query}"));
    let sig = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("sig="))
        .expect("sig");
    let flipped: String = sig
        .char_indices()
        .map(|(i, c)| match (i, c) {
            (0, '0') => '1',
            (0, _) => '0',
            (_, c) => c,
        })
        .collect();
    refused(
        "a signature with one digit changed",
        &format!("{path}?expires={expires}&sig={flipped}"),
    );
    refused(
        "a truncated signature",
        &format!("{path}?expires={expires}&sig={}", &sig[..32]),
    );
    refused("no signature", &format!("{path}?expires={expires}"));
    refused("no expiry", &format!("{path}?sig={sig}"));
    refused(
        "a later expiry under the old signature",
        &format!("{path}?expires={far}&sig={sig}"),
    );
    let past = crate::common::jwt::now() as i64 - 10;
    let (status, body) = raw_get(
        &server.url,
        &format!(
            "{path}?expires={past}&sig={}",
            sign_video_url(&secret, &key, past)
        ),
    );
    assert_eq!(status, 403, "expired: {body}");
    assert!(body.contains("expired"), "{body}");
    // Bob's own URL still works: the refusals above were about the requests, not the files.
    assert_eq!(raw_get(&server.url, &target(&bob_url)).0, 200);
}

#[test]
fn bodies_past_the_limit_are_refused_however_they_are_sent() {
    let server = Server::start(Options {
        extra_args: vec!["--body-limit".into(), "4096".into()],
        ..Options::default()
    });
    let mut big = small_job();
    big["prompt"] = json!("x".repeat(8192));
    let body = big.to_string();
    // Declared with Content-Length.
    let declared = format!(
        "POST /video/submit HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {ALICE}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(raw_request(&server.url, declared.as_bytes()).0, 413);
    // Chunked, so the length is only known once it has been read past the limit.
    let chunk = |text: &str| format!("{:x}\r\n{text}\r\n", text.len());
    let (first, rest) = body.split_at(1000);
    let chunked = format!(
        "POST /video/submit HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {ALICE}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {}{}0\r\n\r\n",
        chunk(first),
        chunk(rest)
    );
    let (status, response) = raw_request(&server.url, chunked.as_bytes());
    assert_eq!(status, 413, "{response}");
    // Request smuggling. A second request on the same connection is answered when the first
    // is well framed (so the check below does see an admin answer when there is one)...
    let admin = format!(
        "GET /admin/plugins HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {ADMIN}\r\n\
         Connection: close\r\n\r\n"
    );
    let status_request = |framing: &str, body: &str| {
        format!(
            "POST /video/status HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {ALICE}\r\n\
             Content-Type: application/json\r\n{framing}\r\n\r\n{body}{admin}"
        )
    };
    let (_, response) = raw_request(
        &server.url,
        status_request("Content-Length: 2", "{}").as_bytes(),
    );
    assert!(
        response.contains("\"plugins\""),
        "a well-framed pipelined admin request was not answered: {response}"
    );
    // ...but after a request whose length two parsers could read two ways, the server reads
    // nothing more from that connection: the admin request hidden behind it is never answered,
    // whichever length a proxy in front believed. Conflicting or malformed lengths are 400;
    // Content-Length beside chunked is read as chunked (RFC 9112 6.3), then the connection closes.
    for (framing, body, expected) in [
        ("Content-Length: 2\r\nContent-Length: 7", "{}0\r\n\r\n", 400),
        ("Content-Length: 2, 7", "{}0\r\n\r\n", 400),
        ("Content-Length: +2", "{}", 400),
        (
            "Transfer-Encoding: gzip, chunked\r\nTransfer-Encoding: identity",
            "{}",
            400,
        ),
        (
            "Content-Length: 7\r\nTransfer-Encoding: chunked",
            "2\r\n{}\r\n0\r\n\r\n",
            422,
        ),
    ] {
        let (status, response) = raw_request(&server.url, status_request(framing, body).as_bytes());
        assert!(
            !response.contains("\"plugins\""),
            "{framing:?}: the admin API answered a smuggled request: {response}"
        );
        assert_eq!(status, expected, "{framing:?}: {response}");
    }
    assert_eq!(server.stored_videos().len(), 0);
}

#[test]
fn a_client_trickling_its_headers_is_cut_off_and_others_are_served() {
    let server = Server::start(Options {
        extra_args: vec!["--header-timeout-ms".into(), "2000".into()],
        ..Options::default()
    });
    let address = server.url.trim_start_matches("http://").to_string();
    // Fifty clients each sending a header byte a second (slowloris).
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..50)
        .map(|_| {
            let stream = TcpStream::connect(&address).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            stream
        })
        .collect();
    let request = b"GET /health HTTP/1.1\r\nHost: wanserve\r\nX-Slow: ";
    let mut closed_after: Vec<Option<Duration>> = vec![None; slow.len()];
    // Meanwhile everyone else is served: /health asked every 100 ms from another thread, each
    // answer's time kept (from `started`).
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = {
        let (done, client, url) = (done.clone(), server.client().clone(), server.url.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                let status = client
                    .get(format!("{url}/health"))
                    .send()
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                answers.push((status, asked.elapsed(), started.elapsed()));
                std::thread::sleep(Duration::from_millis(100));
            }
            answers
        })
    };
    for byte in 0.. {
        for (i, stream) in slow.iter_mut().enumerate() {
            if closed_after[i].is_some() {
                continue;
            }
            let sent = stream.write_all(&[request[byte % request.len()]]);
            let mut buf = [0u8; 256];
            let ended = match stream.read(&mut buf) {
                Ok(_) => true, // EOF, or the server's last words (408) before it closes
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            };
            if sent.is_err() || ended {
                closed_after[i] = Some(started.elapsed());
            }
        }
        if closed_after.iter().all(Option::is_some) || started.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = health.join().expect("the health thread");
    let still_open = closed_after.iter().filter(|c| c.is_none()).count();
    assert_eq!(still_open, 0, "connections the server never closed");
    let earliest = closed_after.iter().flatten().min().expect("closed");
    let latest = closed_after.iter().flatten().max().expect("closed");
    assert!(
        *latest >= Duration::from_millis(1500) && *latest < Duration::from_secs(10),
        "cut off after {latest:?} (deadline 2 s)"
    );
    assert!(
        answers.iter().all(|(status, _, _)| *status == 200),
        "{answers:?}"
    );
    // Served while every slow connection was still held: an answer before the server cut the
    // first one off (at its 2 s deadline), not only after they were gone.
    let first_answer = answers.iter().map(|(_, _, at)| *at).min().expect("answers");
    assert!(
        first_answer < *earliest,
        "no /health answered while the slow connections were held: first at {first_answer:?}, \
         first cut-off at {earliest:?}"
    );
    let slowest = answers
        .iter()
        .map(|(_, took, _)| *took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} /health answers during the trickle, slowest {slowest:?}, first at {first_answer:?}; \
         first cut-off {earliest:?}",
        answers.len()
    );
}

#[test]
fn a_thousand_concurrent_submits_against_a_small_queue_lose_nothing() {
    let server = Server::start(Options {
        queue_limit: Some(4),
        ..Options::default()
    });
    let answers: Vec<(u16, Option<String>, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..1000)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    let mut body = small_job();
                    body["seed"] = json!(i);
                    let response = server.post("/video/submit", Some(ALICE), &body);
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    (status, retry_after, response.json().unwrap_or(Value::Null))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a submitting thread"))
            .collect()
    });
    let mut accepted = Vec::new();
    for (status, retry_after, body) in &answers {
        match status {
            202 => accepted.push(body["requestId"].as_str().expect("requestId").to_string()),
            429 => {
                let seconds: u64 = retry_after
                    .as_deref()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("429 without a Retry-After in seconds: {body}"));
                assert!((1..=3600).contains(&seconds), "Retry-After {seconds}");
            }
            other => panic!("{other}: {body}"),
        }
    }
    let refused = answers.len() - accepted.len();
    assert!(
        !accepted.is_empty() && refused > 900,
        "{} accepted, {refused} refused",
        accepted.len()
    );
    // Every accepted job runs to its video, once.
    for id in &accepted {
        let done = server.wait_final(ALICE, id);
        assert_eq!(done["status"], "Succeed", "{done}");
    }
    assert_eq!(server.stored_videos().len(), accepted.len());
    let metrics = server.metrics();
    assert_eq!(
        requests_counted(&metrics, "/video/submit", 429),
        refused as u64
    );
}

/// `/metrics` lines: series kept by the server until restart.
fn metric_series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.rsplit_once(' ')
                .map_or(l, |(series, _)| series)
                .to_string()
        })
        .collect()
}

#[test]
fn made_up_methods_and_paths_do_not_grow_metrics() {
    let server = Server::start(Options::default());
    let send = |method: &str, target: &str| {
        raw_request(
            &server.url,
            format!("{method} {target} HTTP/1.1\r\nHost: wanserve\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .0
    };
    // One of each kind first, so that the series a flood may legitimately touch exist.
    assert_eq!(send("GET", "/health"), 200);
    send("BREW", "/health");
    send("GET", "/no-such-path");
    send("BREW", "/no-such-path");
    // The first scrape is counted after it answers: the second one shows its series too.
    server.metrics();
    let before = metric_series(&server.metrics());

    for i in 0..300 {
        send(&format!("X{i}JUNK"), "/health");
        send("GET", &format!("/junk/{i}"));
        send(&format!("Y{i}"), &format!("/video/x{i}"));
    }
    let after = server.metrics();
    let after_series = metric_series(&after);
    let grown: Vec<&String> = after_series
        .iter()
        .filter(|s| !before.contains(s))
        .collect();
    assert!(
        grown.is_empty(),
        "900 junk requests added series: {grown:?}"
    );
    assert!(
        !after.contains("JUNK") && !after.contains("/junk/"),
        "a client's method or path became a label"
    );
    let other = requests_counted(&after, "/health", 405)
        + requests_counted(&after, "unmatched", 404)
        + requests_counted(&after, "unmatched", 405);
    assert!(
        other >= 900,
        "the junk requests are still counted, under closed labels: {other}"
    );
    assert!(after.contains("method=\"other\""), "{after}");
}

/// Waits (up to 10 s) until `key`'s status request answers `want`; returns how long it took.
fn until_key_answers(server: &Server, key: &str, want: u16) -> Duration {
    let started = Instant::now();
    loop {
        let got = server
            .status_of_no_job(Some(("authorization", &format!("Bearer {key}"))))
            .status()
            .as_u16();
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{key}: still {got}, not {want}, 10 s after the change:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Replaces `path` the way deploy tools do: write beside it, then rename over it.
fn deploy(path: &std::path::Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).expect("write staged file");
    std::fs::rename(&staged, path).expect("rename over");
}

/// Keys come and go while the server runs: a key added to the key file is accepted, one removed
/// from it or from the config file is refused within the watch's debounce (even if it was
/// accepted a moment ago and that acceptance would otherwise be reused for 10 s), and a config
/// that does not read leaves the one before serving, with the reason in `/admin/plugins`.
#[test]
fn keys_removed_from_the_key_file_or_config_are_refused_without_a_restart() {
    use wanserve::plugins::api_keys::hash_key;
    const CAROL: &str = "carol-key-5555555555";
    const DAVE: &str = "dave-key-7777777777";
    let server = Server::start(Options {
        toml: format!(
            "[plugins.auth.config]\napi_keys = \"carol={}\"\n",
            hash_key(CAROL)
        ),
        ..Options::default()
    });
    let config_file = server.data_dir.with_file_name("wanserve.toml");
    let key_file = server.data_dir.join("api-keys");
    // Accepted twice: the second answer is the host reusing the first acceptance.
    until_key_answers(&server, CAROL, 404);
    until_key_answers(&server, CAROL, 404);
    until_key_answers(&server, DAVE, 401);

    // Added to the key file (written in place, as `echo >>` would).
    std::fs::write(&key_file, format!("dave={}\n", hash_key(DAVE))).expect("write key file");
    let added = until_key_answers(&server, DAVE, 404);

    // Removed from the config file (replaced by a rename): refused, reuse or not.
    deploy(&config_file, "[plugins.auth.config]\napi_keys = \"\"\n");
    let removed_from_config = until_key_answers(&server, CAROL, 401);
    until_key_answers(&server, DAVE, 404);

    // Removed from the key file.
    until_key_answers(&server, DAVE, 404);
    std::fs::write(&key_file, "# no keys\n").expect("write key file");
    let removed_from_key_file = until_key_answers(&server, DAVE, 401);
    // The environment's keys were never touched.
    until_key_answers(&server, ALICE, 404);
    println!(
        "accepted {added:?} after being added; refused {removed_from_config:?} after leaving the \
         config file, {removed_from_key_file:?} after leaving the key file"
    );

    // A config that does not parse changes nothing, and says why.
    std::fs::write(&key_file, format!("dave={}\n", hash_key(DAVE))).expect("write key file");
    until_key_answers(&server, DAVE, 404);
    deploy(&config_file, "[plugins.auth.config\n");
    std::fs::write(&key_file, "# no keys\n").expect("write key file");
    let started = Instant::now();
    let config_error = loop {
        let listed: Value = server
            .client()
            .get(format!("{}/admin/plugins", server.url))
            .bearer_auth(crate::harness::ADMIN)
            .send()
            .expect("sent")
            .json()
            .expect("JSON");
        let auth = listed["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["slot"] == "auth"))
            .cloned()
            .expect("an auth plugin");
        if let Some(error) = auth["configError"].as_str() {
            break error.to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{listed}");
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(
        config_error.contains("wanserve.toml") && config_error.contains("not reloaded"),
        "{config_error}"
    );
    until_key_answers(&server, DAVE, 404);
    until_key_answers(&server, CAROL, 401);

    // Fixed: applied, and the error is gone.
    deploy(&config_file, "[plugins.auth.config]\napi_keys = \"\"\n");
    until_key_answers(&server, DAVE, 401);
    let log = server.log();
    for key in [CAROL, DAVE] {
        assert!(!log.contains(key), "a key reached the log");
    }
}

/// A metric's value as `/metrics` shows it (0 before its first use).
fn metric_value(metrics: &str, name: &str) -> f64 {
    crate::harness::series_value(metrics, name).unwrap_or(0.0)
}

fn error_code(response: reqwest::blocking::Response) -> (u16, Option<u64>, Value) {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    (status, retry_after, response.json().unwrap_or(Value::Null))
}

/// One key cannot take the queue: with `--queue-limit 8` the default validator lets a caller
/// have 2 jobs waiting (a quarter), then answers 429 `caller_busy` with a Retry-After while
/// another key is still accepted and an idempotent retry still gets its job. One key's 120
/// streams: 16 open, the rest 429 with Retry-After, `/health` answered within a second
/// meanwhile, and the 16 cost one job read per second between them, not one each.
#[test]
fn one_key_takes_neither_the_queue_nor_unbounded_streams() {
    let server = Server::start(Options {
        slots: Some(1),
        queue_limit: Some(8),
        ..Options::default()
    });
    let running = server.submit(BOB, &long_job());
    server.wait_for(BOB, &running, Duration::from_secs(60), |s| {
        s["status"] == "InProgress"
    });
    let submit_with_key = |key: &str| {
        server
            .client()
            .post(format!("{}/video/submit", server.url))
            .bearer_auth(ALICE)
            .header("Idempotency-Key", key)
            .json(&long_job())
            .send()
            .expect("sent")
    };
    let first: Value = submit_with_key("first").json().expect("JSON");
    let first = first["requestId"].as_str().expect("requestId").to_string();
    let _second = server.submit(ALICE, &long_job());
    let (status, retry_after, body) =
        error_code(server.post("/video/submit", Some(ALICE), &long_job()));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("caller_busy")),
        "{body}"
    );
    assert!(retry_after.is_some_and(|s| (1..=3600).contains(&s)));
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("at most 2"), "{message}");
    // The retry of an accepted submit is answered with its job, limit or not.
    let retried = submit_with_key("first");
    assert_eq!(retried.status(), 202);
    assert_eq!(retried.json::<Value>().expect("JSON")["requestId"], first);
    // Another caller is not held up by Alice's jobs.
    let bobs_queued = server.submit(BOB, &long_job());

    let url = format!("{}/video/events/{first}", server.url);
    let open = || {
        server
            .client()
            .get(&url)
            .bearer_auth(ALICE)
            .send()
            .expect("sent")
    };
    let mut streams = Vec::new();
    let mut health_worst = Duration::ZERO;
    let mut refused = 0;
    for _ in 0..120 {
        let response = open();
        if response.status() == 200 {
            streams.push(response);
        } else {
            let (status, retry_after, body) = error_code(response);
            assert_eq!((status, retry_after), (429, Some(10)), "{body}");
            assert_eq!(body["error"]["code"], "caller_busy");
            refused += 1;
        }
        let started = Instant::now();
        let health = raw_get(&server.url, "/health");
        assert_eq!(health.0, 200);
        health_worst = health_worst.max(started.elapsed());
    }
    assert_eq!((streams.len(), refused), (16, 104));
    assert!(health_worst < Duration::from_secs(1), "{health_worst:?}");
    eprintln!("16 streams open, 104 refused; slowest /health meanwhile {health_worst:?}");
    // Bob's own stream is his to open.
    let bobs = server
        .client()
        .get(format!("{}/video/events/{bobs_queued}", server.url))
        .bearer_auth(BOB)
        .send()
        .expect("sent");
    assert_eq!(bobs.status(), 200);
    drop(bobs);

    // The server counts a stream until it sees its connection close: at once, or at the latest
    // when the next keep-alive (15 s) fails to send. Wait for that instead of racing it (a
    // fresh-clone run read 17 right after the drop).
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        let metrics = server.metrics();
        let open = metric_value(&metrics, "wanserve_event_streams_open");
        if open == 16.0 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "{open} streams counted 20 s after Bob's closed (Alice holds 16)"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(4));
    let reads = metric_value(&server.metrics(), "wanserve_event_feed_reads_total")
        - metric_value(&before, "wanserve_event_feed_reads_total");
    // One feed for Alice's job (≈ 1 read a second); Bob's ended stream may leave its feed
    // reading for up to a second more. A poll per stream would be 64.
    assert!(reads <= 8.0, "{reads} job reads in 4 s for 16 streams");
    eprintln!("16 streams on one job: {reads} job reads in 4 s");

    // Once the job ends its streams end, and their count with them.
    let cancelled = server.post("/video/cancel", Some(ALICE), &json!({ "requestId": first }));
    assert_eq!(cancelled.status(), 200);
    for stream in streams {
        let mut rest = String::new();
        let mut stream = stream;
        stream.read_to_string(&mut rest).expect("the stream ends");
        assert!(rest.contains("Cancelled"), "{rest}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_value(&server.metrics(), "wanserve_event_streams_open") != 0.0 {
        assert!(Instant::now() < deadline, "streams still counted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the server has closed `stream` (EOF, a reset, or its last answer then EOF), with the
/// status line of what it said, if anything. `None` while it is still open.
fn closed_with(mut stream: &TcpStream, said: &mut Vec<u8>) -> Option<Option<u16>> {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => said.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(said);
    Some(
        text.split_whitespace()
            .nth(1)
            .and_then(|status| status.parse().ok()),
    )
}

#[test]
fn a_connection_flood_and_trickled_bodies_cannot_hold_the_server() {
    let server = Server::start(Options {
        extra_args: vec![
            "--max-connections".into(),
            "20".into(),
            "--body-timeout-ms".into(),
            "2000".into(),
            "--header-timeout-ms".into(),
            "3000".into(),
        ],
        ..Options::default()
    });
    let address = server.url.trim_start_matches("http://").to_string();
    let connect = || {
        let stream = TcpStream::connect(&address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        stream
    };
    // Twenty clients take every connection and send their bodies a byte at a time, each byte
    // well within any per-read timeout: only a deadline on the whole body ends them.
    let started = Instant::now();
    let mut trickling: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut stream = connect();
            let head = format!(
                "POST /video/submit HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {ALICE}\r\n\
                 Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n{{"
            );
            stream.write_all(head.as_bytes()).expect("send head");
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // With the cap taken, a fresh connection still learns the process lives, and anything else
    // is told to come back rather than left hanging.
    let asked = Instant::now();
    let (status, _) = raw_get(&server.url, "/health");
    let health_took = asked.elapsed();
    assert_eq!(status, 200, "health past the connection cap");
    assert!(
        health_took < Duration::from_secs(1),
        "health took {health_took:?}"
    );
    let (status, response) = raw_get(&server.url, "/video/status?requestId=x");
    assert_eq!(status, 503, "{response}");
    assert!(response.contains("\"overloaded\""), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("retry-after: 1"),
        "{response}"
    );

    let mut ended: Vec<Option<(Duration, Option<u16>)>> = vec![None; trickling.len()];
    let mut said: Vec<Vec<u8>> = vec![Vec::new(); trickling.len()];
    while ended.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(10) {
        for (i, stream) in trickling.iter_mut().enumerate() {
            if ended[i].is_some() {
                continue;
            }
            let _ = stream.write_all(b" ");
            if let Some(status) = closed_with(stream, &mut said[i]) {
                ended[i] = Some((started.elapsed(), status));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        ended.iter().all(Option::is_some),
        "trickling connections still open after 10 s: {}",
        ended.iter().filter(|e| e.is_none()).count()
    );
    let timed_out: Vec<Duration> = ended
        .iter()
        .flatten()
        .filter(|(_, status)| *status == Some(408))
        .map(|(after, _)| *after)
        .collect();
    // One place may have gone to a connection the harness's client keeps; that trickler was
    // answered 503 by the overflow responder instead.
    assert!(timed_out.len() >= 19, "answers: {ended:?}");
    let latest = timed_out.iter().max().expect("408s");
    let earliest = timed_out.iter().min().expect("408s");
    assert!(
        *earliest >= Duration::from_millis(1800) && *latest < Duration::from_secs(5),
        "bodies cut off between {earliest:?} and {latest:?} (deadline 2 s)"
    );
    let text = String::from_utf8_lossy(&said[0]).to_string();
    assert!(text.contains("\"request_timeout\""), "{text}");
    eprintln!(
        "trickled bodies cut off between {earliest:?} and {latest:?}; health past the cap in {health_took:?}"
    );

    // Afterwards the server serves as before.
    let (status, response) = raw_get(&server.url, "/video/status?requestId=x");
    assert_ne!(status, 503, "{response}");

    // A flood of idle connections: past the cap and the overflow responder's own, the rest are
    // closed at once; the ones it holds go at their deadlines, and then it answers again.
    let flood_started = Instant::now();
    let flood: Vec<TcpStream> = (0..200).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut flood_said = Vec::new();
    let closed_at_once = flood
        .iter()
        .filter(|stream| {
            flood_said.clear();
            closed_with(stream, &mut flood_said).is_some()
        })
        .count();
    assert!(
        closed_at_once >= 200 - 20 - 64 - 1,
        "{closed_at_once} of 200 closed within 300 ms"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let (status, _) = raw_get(&server.url, "/health");
    assert_eq!(
        status, 200,
        "health once the overflow responder's deadline passed"
    );
    std::thread::sleep(Duration::from_millis(2000));
    let still_open = flood
        .iter()
        .filter(|stream| {
            flood_said.clear();
            closed_with(stream, &mut flood_said).is_none()
        })
        .count();
    assert_eq!(
        still_open,
        0,
        "idle connections open after {:?}",
        flood_started.elapsed()
    );
    let metrics = server
        .client()
        .get(format!("{}/metrics", server.url))
        .send()
        .expect("metrics")
        .text()
        .expect("metrics text");
    let closed = metric_value(
        &metrics,
        "wanserve_connections_refused_total{answer=\"closed\"}",
    );
    let answered = metric_value(
        &metrics,
        "wanserve_connections_refused_total{answer=\"503\"}",
    );
    assert!(
        // Which of the two depends on how fast the responder's connections end under load.
        closed + answered >= 200.0 - 20.0 - 1.0 && answered >= 2.0,
        "refused: {closed} closed, {answered} answered"
    );
    eprintln!("flood of 200: {closed_at_once} closed within 300 ms");
}

//! Jobs through the running server: the flow to `Succeed` and the video fetched without a key,
//! cancel (queued and running, POST and DELETE), two slots, kill -9 and restart, SIGTERM,
//! retention, 429.

use crate::common;
use crate::harness::{ALICE, Options, Server, long_job, small_job};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn state(status: &Value) -> &str {
    status["status"].as_str().unwrap_or_default()
}

fn denoising_step(status: &Value) -> Option<u64> {
    (status["progress"]["stage"] == "denoising")
        .then(|| status["progress"]["step"].as_u64())
        .flatten()
}

fn download(server: &Server, url: &str, dir: &std::path::Path) -> std::path::PathBuf {
    // No Authorization header: the URL alone opens the video.
    let response = reqwest::blocking::get(url).expect("video URL");
    assert_eq!(response.status(), 200, "{url}");
    assert_eq!(
        response.headers()["content-type"]
            .to_str()
            .unwrap_or_default(),
        "video/mp4"
    );
    let bytes = response.bytes().expect("body");
    let path = dir.join("video.mp4");
    std::fs::write(&path, &bytes).expect("write");
    let _ = server;
    path
}

/// A step-cached job through the server: the plan status shows from submit on is the one the
/// pipeline computes from the bundled model's ratios, the log says the passes were skipped, and
/// the video is whole.
#[test]
fn a_step_cached_job_skips_the_planned_passes_and_succeeds() {
    use wanserve::pipeline::step_cache::CacheMode;
    let server = Server::start(Options::default());
    let mut body = small_job();
    body["cache"] = json!("fast");
    let id = server.submit(ALICE, &body);
    let model = wanserve::model::ModelDir::open(&common::tiny_model()).expect("bundled model");
    let request = wanserve::pipeline::GenerateRequest {
        prompt: String::new(),
        negative_prompt: String::new(),
        width: 832,
        height: 480,
        num_frames: 24,
        infer_steps: 20,
        guidance_scale: 5.0,
        seed: 7,
        cache: CacheMode::Fast,
    };
    let plan = wanserve::pipeline::skip_plan(&model.manifest, &request).expect("a plan");
    assert!(plan.skipped_passes() > 0, "the bundled ratios skip nothing");
    let submitted = server.status(ALICE, &id);
    let expected_steps: Vec<u64> = plan.skipped_steps().iter().map(|&s| s as u64).collect();
    assert_eq!(
        submitted["cache"]["skippedSteps"],
        json!(expected_steps),
        "{submitted}"
    );
    let done = server.wait_final(ALICE, &id);
    assert_eq!(state(&done), "Succeed", "{done}\n{}", server.log());
    assert_eq!(done["cache"]["mode"], "fast", "{done}");
    assert_eq!(
        done["cache"]["skippedPasses"],
        plan.skipped_passes() as u64,
        "{done}"
    );
    assert_eq!(done["metadata"]["cache"], "fast", "{done}");
    let generated = server
        .log_line(|l| l.contains("generated") && l.contains("cache=fast"))
        .unwrap_or_else(|| panic!("no cached generation in the log:\n{}", server.log()));
    assert!(
        generated.contains(&format!("skipped_passes={}", plan.skipped_passes())),
        "{generated}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let url = done["results"]["videos"][0]["url"]
        .as_str()
        .expect("a video URL");
    let (codec, width, height, _, frames, _) = common::probe(&download(&server, url, dir.path()));
    assert_eq!(
        (codec.as_str(), width, height, frames),
        ("h264", 832, 480, 24)
    );
}

#[test]
fn a_job_succeeds_and_its_url_opens_without_a_key() {
    let server = Server::start(Options::default());
    let id = server.submit(ALICE, &small_job());
    let first = server.status(ALICE, &id);
    assert!(matches!(state(&first), "InQueue" | "InProgress"), "{first}");
    // Progress and an ETA while it runs: from the second step on the workers have a step's
    // time to go by. (Steps 2 to 20 take over a second; status is polled every 50 ms.)
    let running = server.wait_for(ALICE, &id, Duration::from_secs(120), |s| {
        denoising_step(s).is_some_and(|step| step >= 2)
    });
    assert_eq!(state(&running), "InProgress", "{running}");
    assert_eq!(running["progress"]["total"], 20, "{running}");
    let eta = running["etaSeconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("no ETA at step 2 or later: {running}"));
    assert!(eta.is_finite() && eta > 0.0, "{running}");
    let done = server.wait_final(ALICE, &id);
    assert_eq!(state(&done), "Succeed", "{done}\n{}", server.log());
    assert_eq!(done["seed"], 7);
    // When it was accepted, started and finished, in order.
    let at = |field: &str| {
        done[field]
            .as_i64()
            .unwrap_or_else(|| panic!("{field}: {done}"))
    };
    assert!(
        at("createdAt") <= at("startedAt") && at("startedAt") < at("finishedAt"),
        "{done}"
    );
    // The post-process plugin's metadata comes with the result.
    assert_eq!(done["metadata"]["size"], "832x480", "{done}");
    assert_eq!(done["metadata"]["seed"], "7", "{done}");
    // The operator's log gives the job's peak memory, and what stays resident after it: the
    // sessions give their working memory back at each graph's last run (ORT arena shrinkage),
    // so well under the peak (without it the resident size stayed at the peak).
    let ended = server
        .log_line(|l| l.contains("job ended") && l.contains(id.as_str()))
        .unwrap_or_else(|| panic!("no end of the job in the log:\n{}", server.log()));
    let mib = |field: &str| {
        ended
            .split(&format!(" {field}="))
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {field} in {ended}"))
    };
    let (peak, after) = (mib("peak_rss_mib"), mib("rss_mib"));
    assert!(peak > 10, "{ended}");
    assert!(
        after * 10 < peak * 8,
        "memory not given back after the job: {after} MiB resident, peak {peak} MiB"
    );
    assert!(
        done["results"]["timings"]["inference"]
            .as_f64()
            .is_some_and(|s| s > 0.0)
    );
    let url = done["results"]["videos"][0]["url"]
        .as_str()
        .expect("video url")
        .to_string();
    assert!(url.starts_with(&server.url), "{url} is on this server");

    let dir = tempfile::tempdir().expect("temp");
    let file = download(&server, &url, dir.path());
    let (codec, width, height, rate, frames, pix_fmt) = common::probe(&file);
    assert_eq!(
        (
            codec.as_str(),
            width,
            height,
            rate.as_str(),
            frames,
            pix_fmt.as_str()
        ),
        ("h264", 832, 480, "16/1", 24, "yuv420p")
    );

    // Range requests (video players seek with them).
    let response = server
        .client()
        .get(&url)
        .header("range", "bytes=0-99")
        .send()
        .expect("range");
    assert_eq!(response.status(), 206);
    assert_eq!(response.bytes().expect("body").len(), 100);

    // A tampered signature, a changed expiry, a missing signature, a key outside the store:
    // 403, never the file.
    // (The last hex digit changed: `0` unless it already is `0`.)
    let last = if url.ends_with('0') { "1" } else { "0" };
    let tampered = format!("{}{last}", &url[..url.len() - 1]);
    let (base, query) = url.split_once('?').expect("query");
    let later = query.replace("expires=", "expires=9");
    for bad in [
        tampered,
        format!("{base}?{later}"),
        base.to_string(),
        format!("{}/videos/..%2F..%2Fjobs.db?{query}", server.url),
        format!("{}/videos/../jobs.db?{query}", server.url),
    ] {
        let response = reqwest::blocking::get(&bad).expect("sent");
        assert!(
            matches!(response.status().as_u16(), 403 | 404),
            "{bad}: {}",
            response.status()
        );
        assert!(response.bytes().expect("body").len() < 1000);
    }

    // One object in the store; nothing left in the work directory.
    assert_eq!(
        server.stored_videos().len(),
        1,
        "{:?}",
        server.stored_videos()
    );
    assert!(crate::harness::files_under(&server.data_dir.join("work")).is_empty());
    // Cancelling a finished job: 409, the video stays.
    let response = server.post("/video/cancel", Some(ALICE), &json!({ "requestId": id }));
    assert_eq!(response.status(), 409);
    assert_eq!(state(&server.status(ALICE, &id)), "Succeed");
    let metrics = server.metrics();
    assert!(
        metrics.contains("wanserve_job_duration_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("wanserve_step_duration_seconds"),
        "{metrics}"
    );
}

/// Cancel by POST and by DELETE, queued and running; a running job stops within one step and
/// its slot goes to the next job at once.
#[test]
fn cancel_queued_and_running_jobs() {
    let server = Server::start(Options {
        slots: Some(1),
        ..Options::default()
    });
    let running = server.submit(ALICE, &long_job());
    let next = server.submit(ALICE, &long_job());
    let queued = server.submit(ALICE, &long_job());
    assert_eq!(server.status(ALICE, &next)["position"], 1);
    assert_eq!(server.status(ALICE, &queued)["position"], 2);

    // A queued job leaves the queue at once (POST).
    let response = server.post(
        "/video/cancel",
        Some(ALICE),
        &json!({ "requestId": queued }),
    );
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().expect("JSON"),
        json!({"status": "Succeed"})
    );
    let cancelled = server.status(ALICE, &queued);
    assert_eq!(state(&cancelled), "Cancelled");
    assert!(cancelled["progress"].is_null(), "never ran: {cancelled}");
    // Cancelling again is not an error.
    let response = server.post(
        "/video/cancel",
        Some(ALICE),
        &json!({ "requestId": queued }),
    );
    assert_eq!(response.status(), 200);

    // The running job, once it is denoising (DELETE).
    let seen = server.wait_for(ALICE, &running, Duration::from_secs(120), |s| {
        denoising_step(s).is_some_and(|step| step >= 1)
    });
    let step_at_cancel = denoising_step(&seen).expect("denoising");
    let response = server
        .client()
        .delete(format!("{}/video/cancel", server.url))
        .bearer_auth(ALICE)
        .json(&json!({ "requestId": running }))
        .send()
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(state(&server.status(ALICE, &running)), "Cancelled");
    // Its slot goes to the next job, which starts at once.
    let started = Instant::now();
    server.wait_for(ALICE, &next, Duration::from_secs(60), |s| {
        state(s) == "InProgress"
    });
    let handover = started.elapsed();
    // Where did the cancelled one stop? At most one step after the status we saw (a step that
    // had already begun finishes; no further step starts).
    let stopped = server.status(ALICE, &running);
    let stopped_at = stopped["progress"]["step"].as_u64().expect("progress kept");
    assert!(
        stopped_at <= step_at_cancel + 1,
        "cancel at step {step_at_cancel}, stopped after step {stopped_at}: {stopped}"
    );
    assert!(handover < Duration::from_secs(30), "{handover:?}");
    assert_eq!(stopped["reason"], "cancelled by the client");

    let response = server.post("/video/cancel", Some(ALICE), &json!({ "requestId": next }));
    assert_eq!(response.status(), 200);
    server.wait_for(ALICE, &next, Duration::from_secs(30), |s| {
        state(s) == "Cancelled"
    });
    // Nothing was published and no partial file is left.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.stored_videos().is_empty(),
        "{:?}",
        server.stored_videos()
    );
    assert!(crate::harness::files_under(&server.data_dir.join("work")).is_empty());
}

/// Three jobs, two slots: never more than two run, and two do run at once.
#[test]
fn at_most_two_jobs_run_at_once() {
    let server = Server::start(Options::default());
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let mut body = small_job();
            body["seed"] = json!(100 + i);
            server.submit(ALICE, &body)
        })
        .collect();
    // Steps of the jobs seen denoising in the same poll, mid-way: the two slots really run
    // together (both "InProgress" alone could be one running and one waiting for the model).
    let mut together: Vec<Vec<(usize, u64)>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let finals = loop {
        let statuses: Vec<Value> = ids.iter().map(|id| server.status(ALICE, id)).collect();
        let states: Vec<String> = statuses.iter().map(|s| state(s).to_string()).collect();
        let mid_way: Vec<(usize, u64)> = statuses
            .iter()
            .enumerate()
            .filter_map(|(job, s)| Some((job, denoising_step(s)?)))
            .filter(|(_, step)| (1..20).contains(step))
            .collect();
        if mid_way.len() == 2 {
            together.push(mid_way);
        }
        if states.iter().all(|s| s == "Succeed" || s == "Failed") {
            assert!(states.iter().all(|s| s == "Succeed"), "{states:?}");
            break statuses;
        }
        assert!(Instant::now() < deadline, "{states:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    // How many ran at once, from the server's own record of when each run started and ended
    // (a poll reads the three one after another, so a job ending mid-poll while the third
    // starts would look like three at once). A slot claims its next job only after the last
    // one's final state is written, so the runs of one slot never overlap, even to the ms.
    let runs: Vec<(i64, i64)> = finals
        .iter()
        .map(|s| {
            let at = |field: &str| s[field].as_i64().unwrap_or_else(|| panic!("{field}: {s}"));
            let run = (at("startedAt"), at("finishedAt"));
            assert!(run.0 <= run.1, "{s}");
            run
        })
        .collect();
    let at_once = |of: &[(i64, i64)]| {
        let start = of.iter().map(|r| r.0).max().unwrap_or(0);
        let end = of.iter().map(|r| r.1).min().unwrap_or(0);
        start < end
    };
    assert!(!at_once(&runs), "three ran at once: {runs:?}");
    assert!(
        (0..3).any(|skip| {
            let pair: Vec<(i64, i64)> = (0..3).filter(|j| *j != skip).map(|j| runs[j]).collect();
            at_once(&pair)
        }),
        "no two jobs ran at once: {runs:?}"
    );
    // Both advanced while the other was mid-way too: steps interleave, neither waits it out.
    let both_advanced = together.iter().enumerate().any(|(i, earlier)| {
        together[i + 1..].iter().any(|later| {
            earlier
                .iter()
                .zip(later)
                .all(|((job_a, a), (job_b, b))| job_a == job_b && b > a)
        })
    });
    assert!(
        both_advanced,
        "the two jobs' denoising never overlapped: {together:?}"
    );
    assert_eq!(server.stored_videos().len(), 3);
}

/// kill -9 while a job runs; the restarted server runs it again from the start and it ends
/// with exactly one stored video, the same bytes as an uninterrupted run. Queued jobs keep
/// their place.
#[test]
fn kill_9_during_a_job_loses_nothing_and_duplicates_nothing() {
    let mut server = Server::start(Options {
        slots: Some(1),
        ..Options::default()
    });
    let first = server.submit(ALICE, &small_job());
    let mut second_body = small_job();
    second_body["seed"] = json!(11);
    let second = server.submit(ALICE, &second_body);
    server.wait_for(ALICE, &first, Duration::from_secs(120), |s| {
        denoising_step(s).is_some_and(|step| step >= 3)
    });
    server.kill9();
    server.launch();
    // After the restart: the interrupted job is queued again, ahead of the other.
    let after = server.status(ALICE, &first);
    assert!(matches!(state(&after), "InQueue" | "InProgress"), "{after}");
    for id in [&first, &second] {
        let done = server.wait_final(ALICE, id);
        assert_eq!(state(&done), "Succeed", "{done}");
    }
    let videos = server.stored_videos();
    assert_eq!(videos.len(), 2, "one object per job: {videos:?}");
    assert!(crate::harness::files_under(&server.data_dir.join("work")).is_empty());
    // The re-run is the same video, byte for byte, as an uninterrupted run of the same request,
    // made later by the same process after other jobs (what it left in memory must not matter).
    let uninterrupted = server.submit(ALICE, &small_job());
    assert_eq!(state(&server.wait_final(ALICE, &uninterrupted)), "Succeed");
    let video = |id: &str, name: &str| {
        let url = server.status(ALICE, id)["results"]["videos"][0]["url"]
            .as_str()
            .expect("url")
            .to_string();
        let dir = tempfile::tempdir().expect("temp");
        let path = download(&server, &url, dir.path());
        let (_, _, _, _, frames, _) = common::probe(&path);
        assert_eq!(frames, 24, "{name}");
        std::fs::read(path).expect("the video")
    };
    let rerun = video(&first, "the re-run");
    let later = video(&uninterrupted, "the uninterrupted run");
    assert!(
        rerun == later,
        "the re-run ({} bytes) differs from an uninterrupted run ({} bytes)",
        rerun.len(),
        later.len()
    );
}

/// SIGTERM stops the running job at its next step and keeps it (and the queue) for the next
/// start.
#[test]
fn sigterm_puts_running_jobs_back_in_the_queue() {
    let mut server = Server::start(Options {
        slots: Some(1),
        ..Options::default()
    });
    let id = server.submit(ALICE, &small_job());
    let queued = server.submit(ALICE, &long_job());
    server.wait_for(ALICE, &id, Duration::from_secs(120), |s| {
        denoising_step(s).is_some_and(|step| step >= 1)
    });
    let status = server.terminate();
    assert!(status.success(), "clean exit: {status:?}\n{}", server.log());
    // Stopped mid-way, not waited for: its first attempt ended requeued, unfinished.
    let requeued = server
        .log_line(|l| l.contains(&id) && l.contains("job ended") && l.contains("requeued"))
        .unwrap_or_else(|| panic!("no requeued end for {id}:\n{}", server.log()));
    assert!(requeued.contains("attempt=1"), "{requeued}");
    let stopped_at = wanserve::ids::now_ms();
    server.launch();
    let back = server.status(ALICE, &queued);
    assert_eq!(state(&back), "InQueue", "{back}");
    let response = server.post(
        "/video/cancel",
        Some(ALICE),
        &json!({ "requestId": queued }),
    );
    assert_eq!(response.status(), 200);
    let done = server.wait_final(ALICE, &id);
    assert_eq!(state(&done), "Succeed", "{done}");
    assert_eq!(server.stored_videos().len(), 1);
    // It ran again from the start after the restart, as attempt 2.
    assert!(
        done["startedAt"].as_i64().expect("startedAt") >= stopped_at,
        "{done}"
    );
    let second = server
        .log_line(|l| l.contains(&id) && l.contains("job started") && l.contains("attempt=2"))
        .unwrap_or_else(|| panic!("no second attempt of {id}:\n{}", server.log()));
    assert!(!second.contains("attempt=3"), "{second}");
}

/// A short retention: the sweeper deletes the object (the plugin says delete) and status says
/// the video expired.
#[test]
fn retention_deletes_expired_videos_and_status_says_so() {
    let server = Server::start(Options {
        toml: "[server]\nsweep_interval_ms = 200\n\n[plugins.postprocess.config]\nretention_seconds = \"3\"\n"
            .into(),
        ..Options::default()
    });
    let id = server.submit(ALICE, &small_job());
    let done = server.wait_final(ALICE, &id);
    assert_eq!(state(&done), "Succeed", "{done}");
    assert_eq!(done["expired"], false);
    let url = done["results"]["videos"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    assert_eq!(server.stored_videos().len(), 1);
    let expired = server.wait_for(ALICE, &id, Duration::from_secs(30), |s| {
        s["expired"] == true
    });
    assert_eq!(state(&expired), "Succeed");
    assert_eq!(expired["results"]["videos"], json!([]));
    // The sweeper removes the object shortly after.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.stored_videos().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", server.stored_videos());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old URL no longer opens anything.
    let response = reqwest::blocking::get(&url).expect("sent");
    assert_eq!(response.status(), 403);
}

/// A full queue answers 429 with Retry-After.
#[test]
fn full_queue_answers_429() {
    let server = Server::start(Options {
        slots: Some(1),
        queue_limit: Some(1),
        ..Options::default()
    });
    let running = server.submit(ALICE, &long_job());
    server.wait_for(ALICE, &running, Duration::from_secs(60), |s| {
        state(s) == "InProgress"
    });
    let waiting = server.submit(ALICE, &long_job());
    let response = server.post("/video/submit", Some(ALICE), &long_job());
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    for id in [running, waiting] {
        let response = server.post("/video/cancel", Some(ALICE), &json!({ "requestId": id }));
        assert_eq!(response.status(), 200);
    }
    // Room again.
    let id = server.submit(ALICE, &long_job());
    let response = server.post("/video/cancel", Some(ALICE), &json!({ "requestId": id }));
    assert_eq!(response.status(), 200);
}

/// A job whose generation fails (here: its encoder cannot create its file) ends `Failed` with
/// a reason and an error id, its slot is freed, and the server goes on serving. A store row
/// the server cannot read is a 500 naming an error id that is in the log, and nothing else.
#[test]
fn failures_are_reported_not_leaked() {
    let mut server = Server::start(Options {
        slots: Some(1),
        ..Options::default()
    });
    // The work directory replaced by a file: the encoder cannot open its output.
    let work = server.data_dir.join("work");
    std::fs::remove_dir_all(&work).expect("remove work dir");
    std::fs::write(&work, b"in the way").expect("file in the way");
    let failed = server.submit(ALICE, &small_job());
    let done = server.wait_final(ALICE, &failed);
    assert_eq!(state(&done), "Failed", "{done}");
    let reason = done["reason"].as_str().expect("reason").to_string();
    assert!(
        reason.starts_with("encoding the video failed (error id "),
        "{reason}"
    );
    assert!(!reason.contains(&server.data_dir.display().to_string()));
    let error_id = reason
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .expect("id")
        .to_string();
    assert!(
        server.log_line(|l| l.contains(&error_id)).is_some(),
        "the id is in the log"
    );
    // The slot is free and the next job runs.
    std::fs::remove_file(&work).expect("remove file");
    std::fs::create_dir(&work).expect("work dir back");
    let next = server.submit(ALICE, &small_job());
    assert_eq!(state(&server.wait_final(ALICE, &next)), "Succeed");

    // A corrupt row: 500, a generic message with an id, no SQL, no path, no serde message.
    // (Written behind the server's back while it is stopped: the server caches what it wrote.)
    assert!(server.terminate().success());
    let db = server.data_dir.join("jobs.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .busy_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("open the job database");
        sqlx::query("UPDATE jobs SET request = 'not json' WHERE id = ?")
            .bind(&failed)
            .execute(&mut conn)
            .await
            .expect("corrupt one row");
    });
    server.launch();
    let response = server.post(
        "/video/status",
        Some(ALICE),
        &json!({ "requestId": failed }),
    );
    assert_eq!(response.status(), 500);
    let body: Value = response.json().expect("JSON");
    assert_eq!(body["error"]["code"], "internal");
    let message = body["error"]["message"].as_str().expect("message");
    let id = message
        .strip_prefix("internal error (error id ")
        .and_then(|m| m.strip_suffix(')'))
        .unwrap_or_else(|| panic!("generic message: {message}"));
    assert!(
        server.log_line(|l| l.contains(id)).is_some(),
        "500's id {id} is in the log"
    );
    // Other jobs are unaffected.
    assert_eq!(state(&server.status(ALICE, &next)), "Succeed");
}

/// A post-process plugin that names a key outside the store and traps in `retain`: the host
/// refuses the key and uses its default policy (`<id>.mp4`, `--default-retention-seconds`), and
/// once that expires the sweeper keeps the video (a failing `retain` never deletes), while
/// status reports it expired.
#[test]
fn a_failing_postprocess_plugin_loses_no_video() {
    let server = Server::start(Options {
        toml: "[server]\nsweep_interval_ms = 200\ndefault_retention_seconds = 2\n\n\
               [plugins.postprocess]\nfile = \"test_bad_postprocess.wasm\"\n"
            .into(),
        ..Options::default()
    });
    let id = server.submit(ALICE, &small_job());
    let done = server.wait_final(ALICE, &id);
    assert_eq!(state(&done), "Succeed", "{done}");
    let videos = server.stored_videos();
    assert_eq!(videos.len(), 1);
    assert!(videos[0].ends_with(format!("{id}.mp4")), "{videos:?}");
    let expired = server.wait_for(ALICE, &id, Duration::from_secs(30), |s| {
        s["expired"] == true
    });
    assert_eq!(expired["results"]["videos"], json!([]));
    // The sweeper asked `retain`: it trapped (decide's failure was a bad result, in the job's
    // span; this one is the sweeper's, a trap, logged on one line).
    let retain_failed = server
        .log_line(|l| {
            l.contains("plugin call failed closed")
                && l.contains("slot=postprocess")
                && l.contains("wasm trap")
                && !l.contains("job{")
        })
        .unwrap_or_else(|| panic!("the sweeper never called retain:\n{}", server.log()));
    assert!(
        !retain_failed.contains("unusable result"),
        "{retain_failed}"
    );
    // ...and after that answer the object is still there: a failing retain keeps the video.
    assert_eq!(server.stored_videos().len(), 1);
    assert!(
        !server.log().contains("expired video deleted"),
        "{}",
        server.log()
    );
    // Both failures counted: decide's at publish, and at least one retain.
    let failures: f64 = server
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("wanserve_plugin_failures_total{slot=\"postprocess\"} "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the postprocess failure count");
    assert!(failures >= 2.0, "{failures} failures counted");
}

/// `--log-format json`: every line one JSON object; a request's lines carry its span (method,
/// route, the `X-Request-Id` it came with, the job's request id once known), and the job's own
/// lines carry the same request id, so one id finds both.
#[test]
fn json_logs_join_a_request_to_its_job_by_request_id() {
    let server = Server::start(Options {
        extra_args: vec!["--log-format".into(), "json".into()],
        env: vec![("RUST_LOG".into(), "wanserve=debug".into())],
        ..Options::default()
    });
    let response = server
        .client()
        .post(format!("{}/video/submit", server.url))
        .bearer_auth(ALICE)
        .header("X-Request-Id", "trace-7f3a:01")
        .json(&small_job())
        .send()
        .expect("submit sent");
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["x-request-id"], "trace-7f3a:01");
    let id = response.json::<Value>().expect("JSON")["requestId"]
        .as_str()
        .expect("requestId")
        .to_string();
    let finished = server.wait_final(ALICE, &id);
    assert_eq!(finished["status"], "Succeed", "{finished}");
    // An id a client sends that is not a plain token is replaced, not logged.
    let replaced = server
        .client()
        .get(format!("{}/health", server.url))
        .header("X-Request-Id", "evil\" injected")
        .send()
        .expect("health");
    let fresh = replaced.headers()["x-request-id"].to_str().expect("ascii");
    assert_eq!(fresh.len(), 16, "{fresh}");

    let parsed = |line: &str| serde_json::from_str::<Value>(line).ok();
    let request_done = server
        .log_line(|l| {
            parsed(l).is_some_and(|v| {
                v["fields"]["message"] == "request done"
                    && v["span"]["http_request_id"] == "trace-7f3a:01"
            })
        })
        .expect("the submit's own log line");
    let request_done = parsed(&request_done).expect("JSON");
    assert_eq!(
        request_done["span"]["route"], "/video/submit",
        "{request_done}"
    );
    assert_eq!(request_done["span"]["method"], "POST", "{request_done}");
    assert_eq!(
        request_done["span"]["request_id"],
        id.as_str(),
        "{request_done}"
    );
    assert_eq!(request_done["fields"]["status"], 202, "{request_done}");
    let job_line = server
        .log_line(|l| {
            parsed(l).is_some_and(|v| {
                v["span"]["name"] == "job" && v["span"]["request_id"] == id.as_str()
            })
        })
        .expect("a log line of the job's run");
    let job_line = parsed(&job_line).expect("JSON");
    assert_eq!(job_line["span"]["attempt"], 1, "{job_line}");
    assert!(
        !server.log().contains("injected"),
        "a client's unsafe X-Request-Id reached the log"
    );
    for line in server.log().lines() {
        assert!(parsed(line).is_some(), "not a JSON line: {line}");
    }
}

//! Many hosts, one queue: a real PostgreSQL server and a real S3-compatible server started on
//! loopback, one `--role api` host and two `--role worker` hosts with 2 slots each, all on the
//! tiny model. Jobs spread over the workers (never more than 4 at once, 4 at some point); a
//! worker killed with `kill -9` loses its job to the other one, which publishes the only copy;
//! a cancel sent to the API host stops a job on a worker within a step, and the job's live
//! progress stream on the API host shows the worker's steps and ETA; every URL downloads
//! without credentials.

use crate::harness::{ALICE, Options, Server, long_job, small_job};
use crate::s3::{S3Server, free_port, start_s3};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A PostgreSQL server of Debian's `postgresql` package (scripts/setup installs it) in a
/// temporary directory, on a free loopback port; stopped (immediately) when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/setup --for-tests)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server binary")
}

fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn is_root() -> bool {
    id(&["-u"]) == Some(0)
}

/// The server refuses to run as root: as root, run it as the `postgres` user.
fn as_postgres(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if is_root() {
        let user = id(&["-u", "postgres"]).expect("a postgres user (Debian's package makes it)");
        let group = id(&["-g", "postgres"]).expect("a postgres group");
        command.uid(user).gid(group);
    }
    command
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = postgres_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let run = |command: &mut Command, what: &str| {
            let out = as_postgres(command).output().expect(what);
            assert!(
                out.status.success(),
                "{what} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if is_root() {
            // The postgres user must be able to write the directory.
            let chown = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(chown.success());
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .arg("-D")
            .arg(&data);
        run(&mut initdb, "initdb");
        let port = free_port();
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off",
            dir.path().display()
        );
        run(
            Command::new(bin.join("pg_ctl"))
                .arg("-D")
                .arg(&data)
                .args(["-o", &options, "-w", "-t", "60", "-l"])
                .arg(dir.path().join("postgres.log"))
                .arg("start")
                .stdout(Stdio::null()),
            "pg_ctl start",
        );
        crate::harness::wait_for_port(port, "PostgreSQL");
        Postgres {
            bin,
            data,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(
            Command::new(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .status();
    }
}

fn host(role: &str, postgres: &Postgres, s3: &S3Server) -> Server {
    host_with_env(role, postgres, s3, vec![])
}

fn host_with_env(
    role: &str,
    postgres: &Postgres,
    s3: &S3Server,
    env: Vec<(String, String)>,
) -> Server {
    fleet_host(role, postgres, s3, env, &[])
}

/// A host serving `models` (name, export directory) instead of the bundled one.
fn host_serving(
    role: &str,
    postgres: &Postgres,
    s3: &S3Server,
    models: &[(&str, &Path)],
) -> Server {
    fleet_host(role, postgres, s3, vec![], models)
}

fn fleet_host(
    role: &str,
    postgres: &Postgres,
    s3: &S3Server,
    env: Vec<(String, String)>,
    models: &[(&str, &Path)],
) -> Server {
    let mut extra_args: Vec<String> = vec![
        "--role".into(),
        role.into(),
        "--queue".into(),
        postgres.url(),
        "--store".into(),
        "s3://videos/fleet".into(),
        "--lease-ms".into(),
        "1500".into(),
    ];
    for (name, dir) in models {
        extra_args.push("--model".into());
        extra_args.push(format!("{name}={}", dir.display()));
    }
    Server::start(Options {
        slots: Some(2),
        extra_args,
        env: s3.env().into_iter().chain(env).collect(),
        ..Options::default()
    })
}

/// Debian's libfaketime (scripts/setup installs `faketime` with the test tools).
fn libfaketime() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|dir| Path::new(dir).join("faketime/libfaketime.so.1"))
    .find(|p| p.exists())
    .expect("libfaketime is not installed: scripts/setup --for-tests (Debian's faketime)")
}

fn state(status: &Value) -> &str {
    status["status"].as_str().unwrap_or_default()
}

/// The running-job count of the shared queue, as any host's /metrics reports it.
fn running(server: &Server) -> u64 {
    crate::harness::series_value(&server.metrics(), "wanserve_jobs_running").map_or(0, |v| v as u64)
}

fn download_without_credentials(url: &str, dir: &Path, name: &str) {
    let response = reqwest::blocking::get(url).expect("GET the video");
    assert_eq!(response.status(), 200, "{url}");
    let file = dir.join(name);
    std::fs::write(&file, response.bytes().expect("body")).expect("write");
    let (codec, width, height, _, frames, _) = crate::common::probe(&file);
    assert_eq!((codec.as_str(), width, height), ("h264", 832, 480));
    assert!(frames >= 24);
}

#[test]
fn two_workers_share_one_queue_survive_a_kill_and_obey_cancel() {
    let postgres = Postgres::start();
    let s3 = start_s3("videos");
    let api = host("api", &postgres, &s3);
    let first = host("worker", &postgres, &s3);
    let second = host("worker", &postgres, &s3);

    // The hosts share the signing secrets through the database.
    let webhook_secret = |server: &Server| {
        std::fs::read_to_string(server.data_dir.join("webhook-secret")).expect("webhook secret")
    };
    assert_eq!(webhook_secret(&api), webhook_secret(&first));
    assert_eq!(webhook_secret(&api), webhook_secret(&second));
    assert!(
        !api.data_dir.join("events-secret").exists(),
        "the events secret is the fleet's, not a file of one host"
    );

    // Only operations on a worker; no jobs run on the API host.
    let refused = first.post("/video/submit", Some(ALICE), &small_job());
    assert_eq!(refused.status(), 404, "a worker takes no client requests");
    let ready: Value = api
        .client()
        .get(format!("{}/ready", api.url))
        .send()
        .expect("ready")
        .json()
        .expect("JSON");
    assert_eq!(ready["model_state"], "not_loaded", "{ready}");

    // 8 jobs: at most 4 run at once (2 workers × 2 slots), and 4 do at some point.
    let ids: Vec<String> = (0..8)
        .map(|i| {
            let mut body = small_job();
            body["seed"] = json!(200 + i);
            api.submit(ALICE, &body)
        })
        .collect();
    let mut most = 0;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        let now_running = running(&api);
        assert!(now_running <= 4, "{now_running} jobs running at once");
        most = most.max(now_running);
        let finals = ids
            .iter()
            .filter(|id| {
                matches!(
                    state(&api.status(ALICE, id)),
                    "Succeed" | "Failed" | "Cancelled"
                )
            })
            .count();
        if finals == ids.len() {
            break;
        }
        assert!(Instant::now() < deadline, "jobs did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "8 jobs on 2 workers × 2 slots: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(most, 4, "never 4 jobs at once");
    let dir = tempfile::tempdir().expect("temp");
    for id in &ids {
        let status = api.status(ALICE, id);
        assert_eq!(state(&status), "Succeed", "{status}");
        let url = status["results"]["videos"][0]["url"].as_str().expect("url");
        download_without_credentials(url, dir.path(), &format!("{id}.mp4"));
    }
    // Both workers ran some.
    for worker in [&first, &second] {
        assert!(
            worker.log().contains("job started"),
            "a worker ran nothing:\n{}",
            worker.log()
        );
    }

    // kill -9 the first worker in the middle of a job: the other takes it over once the lease
    // runs out and publishes the only copy.
    let mut victim_job = small_job();
    victim_job["infer_steps"] = json!(40);
    let victim = api.submit(ALICE, &victim_job);
    let on_first = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if first.log().contains(&format!("request_id={victim}")) {
                break true;
            }
            if second.log().contains(&format!("request_id={victim}")) {
                break false;
            }
            assert!(Instant::now() < deadline, "nobody started the job");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (mut dying, survivor) = if on_first {
        (first, second)
    } else {
        (second, first)
    };
    api.wait_for(ALICE, &victim, Duration::from_secs(60), |s| {
        s["progress"]["stage"] == "denoising"
    });
    dying.kill9();
    let killed_at = Instant::now();
    let killed_at_ms = wanserve::ids::now_ms();
    let taken_over = api.wait_for(ALICE, &victim, Duration::from_secs(60), |s| {
        survivor.log().contains(&format!("request_id={victim}")) && state(s) == "InProgress"
    });
    let waited = killed_at.elapsed();
    // Taken over once the lease ran out, not before: the dead worker renewed its 1.5 s lease
    // at most 0.5 s before the kill, so no claim can start within 1 s of it. And within a
    // bound: the lease, a poll of the survivor and slack for a loaded machine.
    let restarted = taken_over["startedAt"].as_i64().expect("startedAt") - killed_at_ms;
    assert!(
        (1000..=10_000).contains(&restarted),
        "the second attempt started {restarted} ms after the kill (lease 1500 ms)"
    );
    let done = api.wait_final(ALICE, &victim);
    assert_eq!(state(&done), "Succeed", "{done}\n{}", survivor.log());
    assert!(
        survivor
            .log_line(|l| l.contains("claimed a job again") && l.contains(&victim))
            .is_some(),
        "{}",
        survivor.log()
    );
    eprintln!(
        "a killed worker's job waited {waited:?} before the other worker took it (started {restarted} ms after the kill)"
    );
    let url = done["results"]["videos"][0]["url"].as_str().expect("url");
    download_without_credentials(url, dir.path(), "victim.mp4");

    // Exactly one object per job in the bucket; nothing temporary.
    let mut objects = s3.objects("videos");
    objects.sort();
    let mut expected: Vec<String> = ids
        .iter()
        .chain(std::iter::once(&victim))
        .map(|id| format!("videos/fleet/{id}.mp4"))
        .collect();
    expected.sort();
    assert_eq!(objects, expected);

    // A cancel sent to the API host stops the job on the worker within a step.
    let target = api.submit(ALICE, &long_job());
    let seen = api.wait_for(ALICE, &target, Duration::from_secs(120), |s| {
        s["progress"]["stage"] == "denoising" && s["progress"]["step"].as_u64() >= Some(1)
    });
    let opened_at = seen["progress"]["step"].as_u64().expect("step");
    // Its live progress stream, opened on the API host while a worker runs it. Cancelled once
    // the worker has stored three more steps and the stream has had time to re-read one (it
    // re-reads every second; a step may take seconds on a loaded machine).
    let stream = api
        .client()
        .get(format!("{}/video/events/{target}", api.url))
        .bearer_auth(ALICE)
        .send()
        .expect("events");
    let reader = std::thread::spawn(move || crate::events::read_events(stream));
    api.wait_for(ALICE, &target, Duration::from_secs(120), |s| {
        s["progress"]["step"].as_u64() >= Some(opened_at + 3)
    });
    std::thread::sleep(Duration::from_millis(1500));
    let step_at_cancel = api.status(ALICE, &target)["progress"]["step"]
        .as_u64()
        .expect("step");
    let response = api.post("/video/cancel", Some(ALICE), &json!({"requestId": target}));
    assert_eq!(response.status(), 200);
    assert!(
        survivor
            .log_line(|l| l.contains("job ended") && l.contains(&target))
            .is_some(),
        "the worker did not stop the job:\n{}",
        survivor.log()
    );
    let stopped = api.status(ALICE, &target);
    assert_eq!(state(&stopped), "Cancelled");
    let stopped_at = stopped["progress"]["step"].as_u64().expect("step kept");
    assert!(
        stopped_at <= step_at_cancel + 1,
        "cancelled at step {step_at_cancel}, stopped after {stopped_at}"
    );
    // The stream showed the worker's steps and ETA (stored with each step), then the end.
    let events = reader
        .join()
        .expect("the stream ends after the final event");
    let in_progress: Vec<&Value> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| state(e) == "InProgress")
        .collect();
    let steps: Vec<u64> = in_progress
        .iter()
        .filter_map(|e| e["progress"]["step"].as_u64())
        .collect();
    assert!(steps.len() >= 2, "{events:?}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert!(steps.first() < steps.last(), "{steps:?}");
    assert!(
        in_progress.iter().any(|e| e["etaSeconds"].is_number()),
        "{in_progress:?}"
    );
    let (_, last) = events.last().expect("events");
    assert_eq!(state(last), "Cancelled");
    drop(dying);
}

#[test]
fn a_worker_whose_clock_runs_ahead_takes_over_no_live_lease() {
    let postgres = Postgres::start();
    let s3 = start_s3("videos");
    let api = host("api", &postgres, &s3);
    let honest = host("worker", &postgres, &s3);
    let job = api.submit(ALICE, &long_job());
    api.wait_for(ALICE, &job, Duration::from_secs(120), |s| {
        s["progress"]["stage"] == "denoising"
    });
    // Four minutes ahead (within S3's signature skew), 160,000 leases of 1.5 s: on its own
    // clock every lease the honest worker writes has long run out.
    let ahead = host_with_env(
        "worker",
        &postgres,
        &s3,
        vec![
            ("LD_PRELOAD".into(), libfaketime().display().to_string()),
            ("FAKETIME".into(), "+240s".into()),
            // Timers and timeouts keep the real pace; only the wall clock is off.
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ],
    );
    // The skew took: the worker's log stamps run minutes ahead of the honest one's.
    let stamp = |server: &Server| -> i64 {
        let line = server
            .log_line(|l| l.contains("listening"))
            .expect("a log line");
        // The line starts with its RFC 3339 time (maybe inside colour codes): hh:mm after the T.
        let at = line.find('T').expect("a timestamp");
        let field = |range: std::ops::Range<usize>| -> i64 {
            line.get(at + range.start..at + range.end)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no time in {line:?}"))
        };
        field(1..3) * 60 + field(4..6)
    };
    let skew = (stamp(&ahead) - stamp(&honest)).rem_euclid(24 * 60);
    assert!((3..=6).contains(&skew), "faketime did not take: {skew} min");
    // Ten lease periods with the job running on the honest worker, the other one polling.
    std::thread::sleep(Duration::from_secs(15));
    let status = api.status(ALICE, &job);
    assert_eq!(
        state(&status),
        "InProgress",
        "the job must still be running: {status}"
    );
    assert!(
        !ahead.log().contains(&format!("request_id={job}")),
        "the job ran on the worker ahead:\n{}",
        ahead.log()
    );
    // And it still works: it takes queued jobs.
    let cancel = api.post("/video/cancel", Some(ALICE), &json!({"requestId": job}));
    assert_eq!(cancel.status(), 200);
    drop(honest);
    let next = api.submit(ALICE, &small_job());
    let done = api.wait_final(ALICE, &next);
    assert_eq!(state(&done), "Succeed", "{done}\n{}", ahead.log());
}

/// An upload through one host's admin API serves on every host within moments, a rollback
/// through another host undoes it everywhere, and a host that was down at the time starts with
/// what the fleet serves (the history lives in the shared database, not in a host's data
/// directory).
#[test]
fn a_plugin_swap_reaches_every_host_and_a_host_that_was_down() {
    use crate::admin::{admin, serving, sha256};
    let postgres = Postgres::start();
    let s3 = start_s3("videos");
    let first = host("api", &postgres, &s3);
    let mut second = host("api", &postgres, &s3);
    let worker = host("worker", &postgres, &s3);
    let seed = serving(&second, "validate");
    let no_prompt = json!({"model": "Wan2.1-T2V-1.3B", "num_frames": 1, "infer_steps": 2});
    let refused = second.post("/video/submit", Some(ALICE), &no_prompt);
    assert_eq!(refused.status(), 422, "the seed's rules want a prompt");

    // The permissive validator (no prompt needed), uploaded through the first host.
    let permissive = std::fs::read(crate::common::plugin_wasm("test-permissive")).expect("wasm");
    let (status, body) = admin(
        &first,
        reqwest::Method::PUT,
        "/admin/plugins/validate",
        permissive.clone(),
    );
    assert_eq!(status, 200, "{body}");
    let uploaded = Instant::now();
    let reached = |server: &Server, wanted: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while serving(server, "validate") != wanted {
            assert!(
                Instant::now() < deadline,
                "the swap did not reach {}",
                server.url
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    reached(&second, &sha256(&permissive));
    eprintln!(
        "an upload reached the second API host in {:.2} s",
        uploaded.elapsed().as_secs_f64()
    );
    let accepted = second.post("/video/submit", Some(ALICE), &no_prompt);
    assert_eq!(accepted.status(), 202, "the second host serves the upload");
    let job: Value = accepted.json().expect("JSON");
    let job = job["requestId"].as_str().expect("requestId").to_string();
    // An events token minted on one API host opens the job's stream on the other (the fleet's
    // secret, from the database), and is checked again after that host restarts (below).
    let minted = first.mint_events_token(ALICE, &job);
    let token = minted["token"].as_str().expect("token").to_string();
    let final_state_by_token = |server: &Server| {
        let response = server.get(&format!("/video/events/{job}?token={token}"));
        let events = crate::events::read_events(response);
        events.last().map(|(_, e)| state(e).to_string())
    };
    assert_eq!(final_state_by_token(&second).as_deref(), Some("Succeed"));
    let altered = crate::harness::with_last_char_altered(&token);
    let refused = second.get(&format!("/video/events/{job}?token={altered}"));
    assert_eq!(refused.status(), 401, "an altered token opens nothing");
    worker.wait_for_log_line(
        Duration::from_secs(15),
        "the swap did not reach the worker",
        |l| l.contains("fleet swap") && l.contains(&sha256(&permissive)),
    );

    // One history for the fleet: the second host sees the upload and rolls it back by digest.
    let (_, history) = admin(
        &second,
        reqwest::Method::GET,
        "/admin/plugins/validate/history",
        vec![],
    );
    assert_eq!(
        history["history"][0]["sha256"],
        sha256(&permissive).as_str()
    );
    assert_eq!(history["history"][0]["source"], "upload", "{history}");
    assert_eq!(history["history"][1]["sha256"], seed.as_str(), "{history}");
    let (status, body) = admin(
        &second,
        reqwest::Method::POST,
        &format!("/admin/plugins/validate/rollback?sha256={seed}"),
        vec![],
    );
    assert_eq!(status, 200, "{body}");
    reached(&first, &seed);

    // Down while the fleet changes: it starts with what the others serve.
    second.terminate();
    let (status, body) = admin(
        &first,
        reqwest::Method::PUT,
        "/admin/plugins/validate",
        permissive.clone(),
    );
    assert_eq!(status, 200, "{body}");
    second.launch();
    assert_eq!(serving(&second, "validate"), sha256(&permissive));
    assert_eq!(
        final_state_by_token(&second).as_deref(),
        Some("Succeed"),
        "a token minted before the restart, on another host, still opens the stream"
    );
    assert!(
        second
            .log_line(|l| l.contains("stored swap") && l.contains(&sha256(&permissive)))
            .is_some(),
        "the restarted host names where its plugin came from"
    );
    let (_, history) = admin(
        &second,
        reqwest::Method::GET,
        "/admin/plugins/validate/history",
        vec![],
    );
    assert_eq!(
        history["history"].as_array().map(Vec::len),
        Some(3),
        "the upload, the file start-up recorded, the upload again (the rollback records nothing): {history}"
    );
}

/// A worker that stops (SIGSTOP) past its lease while running a job loses it to another worker;
/// when it resumes it records nothing: the job keeps the other worker's result and the bucket
/// the one object that worker put there, untouched.
#[test]
fn a_worker_paused_past_its_lease_records_nothing_when_it_resumes() {
    let postgres = Postgres::start();
    let s3 = start_s3("videos");
    let api = host("api", &postgres, &s3);
    let paused = host("worker", &postgres, &s3);
    let mut body = small_job();
    body["infer_steps"] = json!(40);
    let job = api.submit(ALICE, &body);
    api.wait_for(ALICE, &job, Duration::from_secs(60), |s| {
        s["progress"]["stage"] == "denoising"
    });
    paused.signal("STOP");
    let stopped_at_ms = wanserve::ids::now_ms();
    // Started after the pause, so the only worker that can take the job over.
    let other = host("worker", &postgres, &s3);
    let done = api.wait_final(ALICE, &job);
    assert_eq!(state(&done), "Succeed", "{done}\n{}", other.log());
    assert!(
        other
            .log_line(|l| l.contains("claimed a job again") && l.contains(&job))
            .is_some(),
        "{}",
        other.log()
    );
    let restarted = done["startedAt"].as_i64().expect("startedAt") - stopped_at_ms;
    assert!(
        restarted >= 1000,
        "taken over {restarted} ms after the pause, inside the 1.5 s lease"
    );
    let key = format!("videos/fleet/{job}.mp4");
    assert_eq!(s3.objects("videos"), vec![key.clone()]);
    let object = s3.root.path().join(&key);
    let published = std::fs::read(&object).expect("the object");
    let published_at = std::fs::metadata(&object)
        .and_then(|m| m.modified())
        .expect("mtime");

    paused.signal("CONT");
    // On resuming, its next lease renewal tells it the job is another attempt's (or, had it
    // reached publishing first, the fenced write refuses it).
    let refused = paused.wait_for_log_line(
        Duration::from_secs(60),
        "the resumed worker never gave the job up",
        |l| {
            l.contains(&job)
                && (l.contains("no longer this process's job")
                    || l.contains("lost the job to a later attempt"))
        },
    );
    eprintln!("the resumed worker: {refused}");
    assert!(
        paused
            .log_line(|l| l.contains("job ended") && l.contains(&job))
            .is_some(),
        "{}",
        paused.log()
    );
    // The job's record as the resumed worker could have changed it (the URL is signed afresh
    // on each read: its path is the object).
    let record = |s: &Value| {
        let url = s["results"]["videos"][0]["url"]
            .as_str()
            .unwrap_or_default();
        let path = url.split('?').next().unwrap_or_default().to_string();
        json!([
            s["status"],
            s["startedAt"],
            s["finishedAt"],
            s["expiresAt"],
            s["progress"],
            path
        ])
    };
    assert_eq!(
        record(&api.status(ALICE, &job)),
        record(&done),
        "the job's record changed"
    );
    assert_eq!(s3.objects("videos"), vec![key.clone()]);
    assert_eq!(std::fs::read(&object).expect("the object"), published);
    assert_eq!(
        std::fs::metadata(&object)
            .and_then(|m| m.modified())
            .expect("mtime"),
        published_at,
        "the object was written again"
    );
}

/// Workers that serve different models each take only their models' jobs: none is failed by a
/// host that lacks its model, and a job of a model no running worker serves waits in the queue
/// until a worker that serves it starts.
#[test]
fn each_worker_claims_only_the_jobs_of_the_models_it_serves() {
    let postgres = Postgres::start();
    let s3 = start_s3("videos");
    let base = crate::common::tiny_model();
    let other = crate::common::tiny_model_copy();
    let both = [("Wan2.1-T2V-1.3B", base.as_path()), ("other", other.path())];
    let api = host_serving("api", &postgres, &s3, &both);
    let base_worker = host_serving("worker", &postgres, &s3, &both[..1]);
    let job_of = |model: &str| {
        let mut body = small_job();
        body["model"] = json!(model);
        api.submit(ALICE, &body)
    };
    // The other model's job first: the oldest queued job is not one this worker may take.
    let waiting = job_of("other");
    let served = job_of("Wan2.1-T2V-1.3B");
    let done = api.wait_final(ALICE, &served);
    assert_eq!(state(&done), "Succeed", "{done}\n{}", base_worker.log());
    // Several idle polls (0.5 s each) later, still queued and never touched by that worker.
    std::thread::sleep(Duration::from_secs(2));
    let status = api.status(ALICE, &waiting);
    assert_eq!(state(&status), "InQueue", "{status}\n{}", base_worker.log());
    assert!(
        !base_worker.log().contains(&waiting),
        "the worker touched a job of a model it does not serve:\n{}",
        base_worker.log()
    );
    let other_worker = host_serving("worker", &postgres, &s3, &both[1..]);
    let done = api.wait_final(ALICE, &waiting);
    assert_eq!(state(&done), "Succeed", "{done}\n{}", other_worker.log());
    assert!(
        other_worker
            .log_line(|l| l.contains("job started") && l.contains(&waiting))
            .is_some(),
        "{}",
        other_worker.log()
    );
    assert!(!other_worker.log().contains(&served));
    assert!(!base_worker.log().contains(&waiting));
    let mut objects = s3.objects("videos");
    objects.sort();
    let mut expected = vec![
        format!("videos/fleet/{served}.mp4"),
        format!("videos/fleet/{waiting}.mp4"),
    ];
    expected.sort();
    assert_eq!(objects, expected);
}

//! Faults beneath the server: the S3 server gone in the middle of an upload, the local disk
//! full, the server itself killed while its video is being uploaded. Each time the job ends
//! once (with a reason, or with its one video), nothing half-written is left in the store, and
//! the slot is free for the next job.

use crate::harness::{ALICE, Options, Server, files_under, small_job};
use crate::s3::{S3Server, start_s3};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A TCP proxy in front of the S3 server, so that a test can act at the exact moment an upload
/// is under way: with `hold_uploads` set, a connection that starts a `PUT` of a video (not the
/// readiness probe's object) forwards that first chunk (headers and the start of the body) and
/// then nothing more, and is counted in `held`.
struct UploadGate {
    port: u16,
    hold_uploads: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    /// Held connections, to release (close) on demand.
    held_streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl UploadGate {
    fn start(upstream: u16) -> UploadGate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let gate = UploadGate {
            port,
            hold_uploads: Arc::new(AtomicBool::new(false)),
            held: Arc::new(AtomicUsize::new(0)),
            held_streams: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (hold, held, held_streams, stop) = (
            gate.hold_uploads.clone(),
            gate.held.clone(),
            gate.held_streams.clone(),
            gate.stop.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                // An S3 server that is down: the connection is closed at once.
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let (hold, held, held_streams) = (hold.clone(), held.clone(), held_streams.clone());
                let (client_reader, server_writer) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || pump(server, client, None));
                std::thread::spawn(move || {
                    pump(
                        client_reader,
                        server_writer,
                        Some((hold, held, held_streams)),
                    )
                });
            }
        });
        gate
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn wait_held(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.held.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no upload reached the store");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes the held connections (the upload fails on the client's side) and lets the next
    /// ones through.
    fn release(&self) {
        self.hold_uploads.store(false, Ordering::SeqCst);
        for stream in self.held_streams.lock().expect("lock").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for UploadGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.release();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

type Hold = (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    Arc<Mutex<Vec<TcpStream>>>,
);

/// Copies `from` to `to` until either side closes; with `hold`, stops forwarding after the first
/// chunk of a `PUT` while holding is on (and keeps reading, so the sender sees no back-pressure).
fn pump(mut from: TcpStream, mut to: TcpStream, hold: Option<Hold>) {
    let mut buffer = vec![0u8; 64 << 10];
    let mut holding = false;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if holding {
            continue;
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
        if let Some((hold, held, streams)) = &hold
            && hold.load(Ordering::SeqCst)
            && buffer[..n].starts_with(b"PUT ")
            // Videos only: the server's readiness probe writes its own object every 5 s.
            && !String::from_utf8_lossy(&buffer[..n.min(512)]).contains("ready-probe")
        {
            holding = true;
            if let Ok(clone) = from.try_clone() {
                streams.lock().expect("lock").push(clone);
            }
            held.fetch_add(1, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

fn s3_server_behind(gate: &UploadGate, s3: &S3Server, extra_args: &[&str]) -> Server {
    let mut env = s3.env();
    for (name, value) in &mut env {
        if name == "AWS_ENDPOINT" {
            *value = gate.endpoint();
        }
    }
    let mut args: Vec<String> = vec!["--store".into(), "s3://videos/wanserve".into()];
    args.extend(["--slots".into(), "1".into()]);
    args.extend(extra_args.iter().map(|a| a.to_string()));
    Server::start(Options {
        extra_args: args,
        env,
        ..Options::default()
    })
}

fn failure_reason(status: &Value) -> &str {
    status["reason"].as_str().unwrap_or_default()
}

/// The S3 server dies while the video is being uploaded to it: the job fails with a reason once
/// retries give up, no partial object appears, and once S3 is back the next job succeeds.
#[test]
fn s3_gone_during_an_upload_fails_the_job_and_the_next_one_succeeds() {
    let mut s3 = start_s3("videos");
    let gate = UploadGate::start(s3.port);
    let server = s3_server_behind(&gate, &s3, &["--store-retry-seconds", "3"]);

    gate.hold_uploads.store(true, Ordering::SeqCst);
    let id = server.submit(ALICE, &small_job());
    gate.wait_held(Duration::from_secs(120));
    s3.stop();
    gate.release();
    let done = server.wait_final(ALICE, &id);
    assert_eq!(done["status"], "Failed", "{done}");
    assert!(
        failure_reason(&done).contains("storing the video failed"),
        "{done}"
    );
    assert!(server.log().contains("cannot publish the video"));

    s3.restart();
    assert!(s3.objects("videos").is_empty(), "{:?}", s3.all_files());
    let mut next = small_job();
    next["seed"] = json!(8);
    let next = server.submit(ALICE, &next);
    let done = server.wait_final(ALICE, &next);
    assert_eq!(done["status"], "Succeed", "{done}");
    assert_eq!(
        s3.objects("videos"),
        [format!("videos/wanserve/{next}.mp4")]
    );
}

/// `kill -9` of the server while its video is on the wire to S3: after the restart the job runs
/// again and ends with exactly one object; the interrupted upload left nothing.
#[test]
fn kill_9_during_an_upload_leaves_one_object_and_no_partial_one() {
    let s3 = start_s3("videos");
    let gate = UploadGate::start(s3.port);
    let mut server = s3_server_behind(&gate, &s3, &[]);

    gate.hold_uploads.store(true, Ordering::SeqCst);
    let id = server.submit(ALICE, &small_job());
    gate.wait_held(Duration::from_secs(120));
    server.kill9();
    gate.release();
    assert!(s3.objects("videos").is_empty(), "{:?}", s3.all_files());

    server.launch();
    let done = server.wait_final(ALICE, &id);
    assert_eq!(done["status"], "Succeed", "{done}");
    assert_eq!(s3.objects("videos"), [format!("videos/wanserve/{id}.mp4")]);
    // Besides the object: s3s-fs's bookkeeping (`.bucket-<b64>.object-<b64>.*.json`) for it and
    // for the readiness probe's object, nothing (no temporary upload file).
    let key = format!("wanserve/{id}.mp4");
    let stray: Vec<String> = s3
        .all_files()
        .into_iter()
        .filter(|f| *f != format!("videos/{key}"))
        .filter(|f| {
            let object = bookkept_object(f);
            object.as_deref() != Some(key.as_str())
                && object.as_deref() != Some("wanserve/.wanserve-ready-probe")
        })
        .collect();
    assert!(stray.is_empty(), "left in the store: {stray:?}");
    assert!(files_under(&server.data_dir.join("work")).is_empty());
}

/// The object an s3s-fs bookkeeping file (`.bucket-<b64>.object-<b64>.<kind>.json`) is about.
fn bookkept_object(file: &str) -> Option<String> {
    use base64::Engine;
    let encoded = file.split(".object-").nth(1)?.split('.').next()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(encoded))
        .ok()?;
    String::from_utf8(bytes).ok()
}

/// A small filesystem mounted for one test (tmpfs; the suite runs as root, as CI does).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (scripts/setup and CI run as root)"
        );
        SmallDisk { dir }
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// The local store's disk fills up during the publish: the job fails with a reason, nothing
/// half-written is left, and once there is room again the next job succeeds.
#[test]
fn a_full_disk_fails_the_job_and_leaves_nothing_half_written() {
    // Room for the readiness probe, not for a video.
    let disk = SmallDisk::mount("48k");
    let server = Server::start(Options {
        slots: Some(1),
        extra_args: vec![
            "--store".into(),
            format!("file://{}", disk.dir.path().display()),
        ],
        ..Options::default()
    });
    let id = server.submit(ALICE, &small_job());
    let done = server.wait_final(ALICE, &id);
    assert_eq!(done["status"], "Failed", "{done}");
    assert!(
        failure_reason(&done).contains("storing the video failed"),
        "{done}"
    );
    assert_eq!(
        files_under(disk.dir.path()),
        Vec::<std::path::PathBuf>::new(),
        "a half-written video was left"
    );

    disk.resize("64m");
    let mut next = small_job();
    next["seed"] = json!(8);
    let next = server.submit(ALICE, &next);
    let done = server.wait_final(ALICE, &next);
    assert_eq!(done["status"], "Succeed", "{done}");
    let stored = files_under(disk.dir.path());
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].ends_with(format!("{next}.mp4")), "{stored:?}");
}

#[test]
fn a_second_server_on_the_same_data_directory_exits_with_a_clear_error() {
    let mut first = Server::start(Options::default());
    let running = first.submit(ALICE, &crate::harness::long_job());
    let second = |data_dir: &std::path::Path| {
        crate::harness::serve_until_it_exits(
            data_dir,
            |_| {},
            "the second server kept running on the first one's data directory",
        )
    };
    let (status, stderr) = second(&first.data_dir);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("another wanserve process (pid ")
            && stderr.contains("serving from this data directory"),
        "{stderr}"
    );
    // The first one's running job was not requeued behind its back, and it still serves.
    let status = first.status(ALICE, &running);
    assert_ne!(status["status"], "Failed", "{status}");
    assert_eq!(
        first
            .post("/video/cancel", Some(ALICE), &json!({"requestId": running}))
            .status(),
        200
    );
    // Once it is gone (even killed), the directory is free again.
    first.kill9();
    first.launch();
    assert_eq!(
        first
            .client()
            .get(format!("{}/health", first.url))
            .send()
            .expect("health")
            .status(),
        200
    );
}

#[test]
fn readiness_never_flaps_under_concurrent_probes_and_follows_the_store() {
    let server = Server::start(Options::default());
    let ready = |url: &str| crate::harness::raw_get(url, "/ready");
    // 200 probes at once on a healthy, idle server: every one is 200.
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let probes: Vec<_> = (0..200)
            .map(|_| scope.spawn(|| ready(&server.url).0))
            .collect();
        probes
            .into_iter()
            .map(|p| p.join().expect("probe"))
            .collect()
    });
    let refused = answers.iter().filter(|s| **s != 200).count();
    assert_eq!(
        refused, 0,
        "{refused} of 200 concurrent probes were not 200"
    );

    // The store stops taking writes (its directory replaced by a file): 503 within the
    // documented 10 s, with `store: false`; back to 200 once it works again.
    let videos = server.data_dir.join("videos");
    let away = server.data_dir.join("videos.away");
    std::fs::rename(&videos, &away).expect("move the store away");
    std::fs::write(&videos, b"not a directory").expect("a file in its place");
    let (took, body) = ready_turns(&server.url, 503);
    assert!(took < Duration::from_secs(11), "503 only after {took:?}");
    assert!(body.contains("\"store\":false"), "{body}");
    std::fs::remove_file(&videos).expect("remove the file");
    std::fs::rename(&away, &videos).expect("the store back");
    let (took, _) = ready_turns(&server.url, 200);
    assert!(
        took < Duration::from_secs(11),
        "ready again only after {took:?}"
    );
    // No probe object is left behind in the store (one name: at most the one in flight).
    let left: Vec<_> = std::fs::read_dir(&videos)
        .expect("videos")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("ready-probe"))
        .collect();
    assert!(left.len() <= 1, "probe objects left: {left:?}");
}

/// Polls `/ready` until it answers `status`: how long that took, and the body.
fn ready_turns(url: &str, status: u16) -> (Duration, String) {
    let since = Instant::now();
    loop {
        let (got, body) = crate::harness::raw_get(url, "/ready");
        if got == status {
            return (since.elapsed(), body);
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "/ready still {got} after 30 s: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

//! The client commands against a running server: `wanserve submit --wait` (progress, download,
//! probe), across a server restart, the server's refusals as messages and exit codes, `status`,
//! and `cancel` of a job another `submit --wait` is following.

use crate::common::{self, probe};
use crate::harness::{ALICE, Options, Server};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn client(server: &Server, key: &str) -> Command {
    let mut command = common::wanserve();
    command
        .env("WANSERVE_SERVER", &server.url)
        .env("WANSERVE_API_KEY", key)
        .env_remove("RUST_LOG");
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn run(command: &mut Command) -> Output {
    command.output().expect("wanserve runs")
}

/// The steps of the `denoising k/n` progress lines, in order.
fn denoising_steps(stderr: &str) -> Vec<u32> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("denoising "))
        .filter_map(|rest| rest.split('/').next()?.parse().ok())
        .collect()
}

/// Starts `command` (a `submit` that follows its job) with piped output and reads the
/// `requestId` it prints first.
fn spawn_follower(command: &mut Command) -> (std::process::Child, String) {
    let mut follower = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wanserve runs");
    let mut stdout = String::new();
    BufReader::new(follower.stdout.take().expect("stdout"))
        .read_line(&mut stdout)
        .expect("the requestId line");
    (follower, stdout.trim().to_string())
}

#[test]
fn submit_wait_shows_progress_and_writes_the_video() {
    let server = Server::start(Options::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("sunset.mp4");
    let out = run(client(&server, ALICE)
        .args([
            "submit",
            "--prompt",
            "A beautiful sunset over the mountains",
        ])
        .args(["--num-frames", "24", "--infer-steps", "20", "--seed", "7"])
        .arg("--output")
        .arg(&output));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    let id = stdout.trim();
    assert_eq!(id.len(), 32, "stdout is the requestId: {stdout:?}");

    // Progress: denoising steps only go forward (a line per change: the ETA may change within
    // a step; a busy stream skips to the latest state), then the job succeeds and the file is
    // written.
    let steps = denoising_steps(&stderr);
    assert!(steps.len() >= 3, "too few progress lines:\n{stderr}");
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{stderr}");
    assert!(steps.last() > steps.first(), "{stderr}");
    assert!(stderr.contains("ETA"), "{stderr}");
    assert!(stderr.lines().any(|l| l == "Succeed"), "{stderr}");
    assert!(
        stderr.contains(&format!("wrote {}", output.display())),
        "{stderr}"
    );
    let (codec, width, height, _, frames, _) = probe(&output);
    assert_eq!(
        (codec.as_str(), width, height, frames),
        ("h264", 832, 480, 24)
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["sunset.mp4"], "only the video is left");

    // `status` prints the server's status as JSON.
    let out = run(client(&server, ALICE).args(["status", id]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(status["status"], "Succeed");
    assert_eq!(status["seed"], 7);
}

/// `submit --wait` outlives a server restart: SIGTERM puts the running job back in the queue,
/// the server comes back on the same address, and the follower reopens its stream, sees the
/// job run again and writes the video.
#[test]
fn submit_wait_follows_its_job_across_a_server_restart() {
    let mut server = Server::start(Options::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("sunset.mp4");
    let (mut follower, id) = spawn_follower(
        client(&server, ALICE)
            .args([
                "submit",
                "--prompt",
                "A beautiful sunset over the mountains",
            ])
            .args(["--num-frames", "24", "--infer-steps", "40", "--seed", "7"])
            .arg("--output")
            .arg(&output),
    );
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stderr = follower.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    // Wait until the job is a few steps in.
    let started = Instant::now();
    let mut before = Vec::new();
    loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("progress lines");
        before.push(line);
        if denoising_steps(&before.join("\n")).last() >= Some(&3) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress: {before:?}"
        );
    }
    assert!(server.terminate().success());
    server.relaunch_on_the_same_port();
    let code = follower.wait().expect("the follower ends");
    reader.join().expect("stderr read");
    let after: Vec<String> = lines_rx.try_iter().collect();
    let stderr = [before.clone(), after.clone()].concat().join("\n");
    assert!(code.success(), "{stderr}");
    // Its progress started over: the job ran again on the restarted server.
    let steps = denoising_steps(&stderr);
    assert!(
        steps.windows(2).any(|w| w[1] < w[0]),
        "no step went back, so the job did not run again: {steps:?}\n{stderr}"
    );
    let log = server.log();
    let runs = log
        .lines()
        .filter(|l| l.contains("job started") && l.contains(&id))
        .count();
    assert_eq!(runs, 2, "once before the restart, once after:\n{log}");
    assert!(stderr.lines().any(|l| l == "Succeed"), "{stderr}");
    let (codec, width, height, _, frames, _) = probe(&output);
    assert_eq!(
        (codec.as_str(), width, height, frames),
        ("h264", 832, 480, 24)
    );
}

#[test]
fn refusals_exit_non_zero_with_the_servers_message() {
    let server = Server::start(Options::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("never.mp4");
    let out = run(client(&server, ALICE)
        .args(["submit", "--prompt", "short", "--num-frames", "500"])
        .arg("--output")
        .arg(&output));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("422"), "{stderr}");
    assert!(stderr.contains("\n  num_frames: "), "{stderr}");
    assert!(stderr.contains("\n  prompt: "), "{stderr}");
    assert!(out.stdout.is_empty(), "no requestId for a refused job");
    assert!(!output.exists());

    let out = run(client(&server, "not-a-key-at-all").args(["status", &"a".repeat(32)]));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        !stderr.contains("not-a-key-at-all"),
        "the key is not echoed"
    );

    let out = run(client(&server, ALICE).args(["cancel", &"b".repeat(32)]));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));

    // A server that is not there: the address and the cause, not a panic.
    let out = run(client(&server, ALICE)
        .env("WANSERVE_SERVER", "http://127.0.0.1:9")
        .args(["status", &"a".repeat(32)]));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach http://127.0.0.1:9/"),
        "{stderr}"
    );
}

#[test]
fn cancel_stops_a_job_that_submit_wait_follows() {
    let server = Server::start(Options::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut follower, id) = spawn_follower(
        client(&server, ALICE)
            .args([
                "submit",
                "--prompt",
                "A very long video of a very slow sunset",
            ])
            .args(["--num-frames", "120", "--infer-steps", "100", "--wait"])
            .current_dir(dir.path()),
    );
    let mut lines = BufReader::new(follower.stderr.take().expect("stderr")).lines();
    let started = Instant::now();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.expect("stderr line");
        seen.push(line.clone());
        if line.starts_with("denoising ") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress: {seen:?}"
        );
    }

    let out = run(client(&server, ALICE).args(["cancel", &id]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let code = follower.wait().expect("the follower ends");
    assert_eq!(code.code(), Some(1), "{rest:?}");
    let last = rest.last().cloned().unwrap_or_default();
    assert!(
        last.contains(&format!("job {id} was cancelled")),
        "{rest:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        0,
        "nothing written for a cancelled job"
    );
}

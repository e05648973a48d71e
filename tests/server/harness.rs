//! Starts the real `wanserve serve` binary on a free loopback port with the bundled tiny model
//! and the real plugins, and talks to it over HTTP.

use crate::common;
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const ALICE: &str = "alice-key-0123456789";
pub const BOB: &str = "bob-key-9876543210";
pub const ADMIN: &str = "admin-key-0123456789abcdef";

/// What a test may change about the server it starts.
#[derive(Default, Clone)]
pub struct Options {
    pub slots: Option<usize>,
    pub queue_limit: Option<u64>,
    /// Extra TOML appended to the config file (e.g. a postprocess plugin config).
    pub toml: String,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub plugin_dir: Option<PathBuf>,
    /// Return once the server listens, without waiting for /ready.
    pub no_ready_wait: bool,
}

pub struct Server {
    child: Option<Child>,
    pub url: String,
    pub data_dir: PathBuf,
    options: Options,
    /// The port to listen on; the OS picks one when unset.
    port: Option<u16>,
    client: Client,
    _temp: Option<tempfile::TempDir>,
    /// See [`Server::stop_when_tests_exit`].
    _exit_watch: Option<Child>,
}

/// The directory with the default components (built once per test binary).
pub fn plugin_dir() -> PathBuf {
    common::plugin_wasm("validate-seed")
        .parent()
        .expect("components live in a directory")
        .to_path_buf()
}

impl Server {
    pub fn start(options: Options) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join("data");
        let mut server = Server {
            child: None,
            url: String::new(),
            data_dir,
            options,
            port: None,
            client: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("HTTP client"),
            _temp: Some(temp),
            _exit_watch: None,
        };
        server.launch();
        server
    }

    /// Starts (again) on the same data directory.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        let config = self.data_dir.with_file_name("wanserve.toml");
        std::fs::write(&config, &self.options.toml).expect("write config");
        let plugin_dir = self.options.plugin_dir.clone().unwrap_or_else(plugin_dir);
        let mut command = common::wanserve();
        command
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port"])
            .arg(self.port.unwrap_or(0).to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--config")
            .arg(&config)
            .arg("--plugin-dir")
            .arg(&plugin_dir)
            .args(["--threads", "1"])
            .env("WANSERVE_API_KEYS", format!("{ALICE},{BOB}"))
            .env("WANSERVE_ADMIN_KEY", ADMIN)
            .env("RUST_LOG", "wanserve=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(slots) = self.options.slots {
            command.args(["--slots", &slots.to_string()]);
        }
        if let Some(limit) = self.options.queue_limit {
            command.args(["--queue-limit", &limit.to_string()]);
        }
        command.args(&self.options.extra_args);
        for (k, v) in &self.options.env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("wanserve starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.data_dir.with_file_name("server.log");
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("log file");
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        self.url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start:\n{}", self.log());
            }
        };
        self.child = Some(child);
        if !self.options.no_ready_wait {
            self.wait_ready();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_file_name("server.log")).unwrap_or_default()
    }

    /// The first log line that `matches`, waiting up to 10 s for it: the log reaches the file
    /// through a copying thread, so a line logged just before a response may not be there yet.
    /// The first log line that `matches`, waiting up to `timeout` for it to be written (where
    /// [`Server::log_line`] gives up after 10 s and returns `None`).
    pub fn wait_for_log_line(
        &self,
        timeout: Duration,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| matches(l)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "{what} (no such log line in {timeout:?}):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_line(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.log().lines().find(|l| matches(l)) {
                return Some(line.to_string());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = self.client.get(format!("{}/ready", self.url)).send()
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server never became ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// For a server kept in a `static`, which is never dropped: it is killed and its directory
    /// removed when this test binary ends, however it ends. A `sh` waits for end-of-file on a
    /// pipe only this process holds (std opens it close-on-exec), which the OS closes at exit.
    pub fn stop_when_tests_exit(mut self) -> Server {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let dir = self
            .data_dir
            .parent()
            .expect("in its temp dir")
            .to_path_buf();
        let watch = Command::new("sh")
            .args(["-c", r#"read _; kill -9 "$1"; rm -rf "$2""#, "sh", &pid])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sh starts");
        self._exit_watch = Some(watch);
        self
    }

    /// Sends `signal` (a name `kill -s` takes: `STOP`, `CONT`) to the running server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -s {signal} {pid}");
    }

    /// Starts again on the same data directory and the address it last listened on, for
    /// clients that hold the URL (SIGTERM or `kill9` first).
    pub fn relaunch_on_the_same_port(&mut self) {
        let port = self
            .url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no port in {}", self.url));
        self.port = Some(port);
        self.launch();
        assert!(self.url.ends_with(&format!(":{port}")), "{}", self.url);
    }

    /// `kill -9`: no shutdown, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `GET path` (with its query), without credentials.
    pub fn get(&self, path: &str) -> Response {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .expect("request sent")
    }

    pub fn post(&self, path: &str, key: Option<&str>, body: &Value) -> Response {
        let mut request = self.client.post(format!("{}{path}", self.url)).json(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send().expect("request sent")
    }

    pub fn submit(&self, key: &str, body: &Value) -> String {
        let response = self.post("/video/submit", Some(key), body);
        let status = response.status();
        let text = response.text().unwrap_or_default();
        assert_eq!(status, 202, "submit refused: {text}");
        let answer: Value = serde_json::from_str(&text).expect("JSON");
        answer["requestId"].as_str().expect("requestId").to_string()
    }

    /// `GET /models` with `key`, as JSON (200 asserted).
    pub fn models(&self, key: &str) -> Value {
        let response = self
            .client()
            .get(format!("{}/models", self.url))
            .bearer_auth(key)
            .send()
            .expect("GET /models");
        assert_eq!(response.status(), 200);
        response.json().expect("JSON")
    }

    /// `POST /video/events-token` for job `id` with `key`: the answer (`token`, `expiresIn`).
    pub fn mint_events_token(&self, key: &str, id: &str) -> Value {
        self.post("/video/events-token", Some(key), &json!({"requestId": id}))
            .json()
            .expect("JSON")
    }

    pub fn status(&self, key: &str, id: &str) -> Value {
        let response = self.post("/video/status", Some(key), &json!({ "requestId": id }));
        let code = response.status();
        let body = response.text().unwrap_or_default();
        if code != 200 {
            // The log reaches its file through a copying thread: let it catch up.
            std::thread::sleep(Duration::from_millis(500));
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "status of {id}: {code} {body}\nserver log, last lines first:\n{}",
                tail.join("\n")
            );
        }
        serde_json::from_str(&body).expect("JSON")
    }

    /// Polls until `done(status)` holds; returns that status.
    pub fn wait_for(
        &self,
        key: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status(key, id);
            if done(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached the expected state; last status {status}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_final(&self, key: &str, id: &str) -> Value {
        self.wait_for(key, id, Duration::from_secs(600), |s| {
            matches!(
                s["status"].as_str(),
                Some("Succeed" | "Failed" | "Cancelled")
            )
        })
    }

    /// `POST /video/status` for a job nobody submitted, with `header` (if any) and nothing
    /// else: what authentication makes of a request (401, 503, or 404 once let in).
    pub fn status_of_no_job(&self, header: Option<(&str, &str)>) -> Response {
        let mut request = self
            .client
            .post(format!("{}/video/status", self.url))
            .json(&json!({"requestId": "a".repeat(32)}));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        request.send().expect("sent")
    }

    pub fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.url))
            .send()
            .expect("metrics")
            .text()
            .expect("text")
    }

    /// Files under the local video store.
    pub fn stored_videos(&self) -> Vec<PathBuf> {
        files_under(&self.data_dir.join("videos"))
    }
}

pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of one series in a `/metrics` text: `series` is its name with its labels as the
/// exporter prints them (`wanserve_jobs_running`, `wanserve_plugin_failures_total{slot="auth"}`).
pub fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Plugin calls of `slot` running in `server` now (`wanserve_plugin_calls_running`).
pub fn plugin_calls_running(server: &Server, slot: &str) -> f64 {
    let series = format!("wanserve_plugin_calls_running{{slot=\"{slot}\"}}");
    series_value(&server.metrics(), &series)
        .unwrap_or_else(|| panic!("no {series} series in /metrics"))
}

/// `token` with its last character changed: a signature that no longer verifies.
pub fn with_last_char_altered(token: &str) -> String {
    let flipped = if token.ends_with('A') { "B" } else { "A" };
    let mut altered = token.to_string();
    altered.replace_range(altered.len() - 1.., flipped);
    altered
}

/// The smallest job the seed allows (24 frames, 20 steps): a few seconds on the tiny model.
pub fn small_job() -> Value {
    json!({
        "model": "Wan2.1-T2V-1.3B", "prompt": "A beautiful sunset over the mountains",
        "image_size": "832x480", "num_frames": 24, "guidance_scale": 5.0, "infer_steps": 20,
        "seed": 7
    })
}

/// The largest job the seed allows: long enough to cancel while it runs.
pub fn long_job() -> Value {
    json!({
        "model": "Wan2.1-T2V-1.3B", "prompt": "A very long video of a very slow sunset",
        "image_size": "832x480", "num_frames": 120, "guidance_scale": 5.0, "infer_steps": 100,
        "seed": 3
    })
}

/// Waits until something listens on loopback `port` (a helper server the test started).
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `request` as it is (no URL normalisation, no encoding: what a hostile client sends)
/// to the server at `base` (`http://127.0.0.1:port`) and reads until the server closes:
/// (status, the whole response after the status line).
pub fn raw_request(base: &str, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream.write_all(request).expect("send");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_string();
    let (line, rest) = response.split_once("\r\n").unwrap_or((&response, ""));
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    (status, rest.to_string())
}

/// `GET target` with nothing else but `Host` and `Connection: close`.
pub fn raw_get(base: &str, target: &str) -> (u16, String) {
    raw_request(
        base,
        format!("GET {target} HTTP/1.1\r\nHost: wanserve\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Runs `wanserve serve` on `data_dir` (loopback, port 0, one thread, the test plugins, the
/// test API keys) with `customise` applied, expecting it to exit on its own within 60 s; its
/// exit status and stderr. `what` says what a server that kept running did wrong.
pub fn serve_until_it_exits(
    data_dir: &Path,
    customise: impl FnOnce(&mut Command),
    what: &str,
) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut command = common::wanserve();
    command
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            "1",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--plugin-dir")
        .arg(plugin_dir())
        .env("WANSERVE_API_KEYS", ALICE)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    customise(&mut command);
    let mut child = command.spawn().expect("wanserve starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("stderr");
    (status, stderr)
}

/// [`serve_until_it_exits`] for a start that must be refused: it exits unsuccessfully, and its
/// `error:` line comes back with the whole stderr.
pub fn start_refused(
    data_dir: &Path,
    customise: impl FnOnce(&mut Command),
    what: &str,
) -> (String, String) {
    let (status, stderr) = serve_until_it_exits(data_dir, customise, what);
    assert!(!status.success(), "{what}: {stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"))
        .to_string();
    (error, stderr)
}

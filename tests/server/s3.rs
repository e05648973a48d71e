//! The same flow against a real S3-compatible server (`s3s-fs`, installed by scripts/setup)
//! started on loopback: the video is stored in the bucket and the presigned URL that status
//! hands out downloads without credentials.

use crate::common;
use crate::harness::{ALICE, Options, Server, files_under, small_job};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub const ACCESS_KEY: &str = "wanserve-test-access";
pub const SECRET_KEY: &str = "wanserve-test-secret-0123456789";

pub struct S3Server {
    child: Child,
    pub port: u16,
    pub root: tempfile::TempDir,
}

impl S3Server {
    /// The environment a server needs to use this S3 server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_ENDPOINT".into(), self.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Objects in `bucket`, as `bucket/key` (s3s-fs's own bookkeeping left out).
    pub fn objects(&self, bucket: &str) -> Vec<String> {
        files_under(&self.root.path().join(bucket))
            .iter()
            .filter_map(|p| p.strip_prefix(self.root.path()).ok())
            .map(|p| p.display().to_string())
            .filter(|p| !p.contains(".s3s"))
            // The server's readiness probe object: there between its write and delete (and
            // after a crash between them, until any host's next probe).
            .filter(|p| !p.contains(".wanserve-ready-probe"))
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3s_fs() -> PathBuf {
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let installed = cargo_home.join("bin").join("s3s-fs");
    if installed.exists() {
        installed
    } else {
        PathBuf::from("s3s-fs")
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn start_s3(bucket: &str) -> S3Server {
    let root = tempfile::tempdir().expect("temp");
    std::fs::create_dir_all(root.path().join(bucket)).expect("bucket dir");
    let port = free_port();
    let child = spawn_s3s_fs(port, root.path());
    S3Server { child, port, root }
}

fn spawn_s3s_fs(port: u16, root: &std::path::Path) -> Child {
    let child = Command::new(s3s_fs())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .arg(root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("s3s-fs runs (scripts/setup installs it)");
    crate::harness::wait_for_port(port, "s3s-fs");
    child
}

impl S3Server {
    /// Stops the server at once (SIGKILL): an S3 endpoint gone.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn_s3s_fs(self.port, self.root.path());
    }

    /// Every file under the server's directory, bookkeeping included.
    pub fn all_files(&self) -> Vec<String> {
        files_under(self.root.path())
            .iter()
            .filter_map(|p| p.strip_prefix(self.root.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }
}

#[test]
fn videos_go_to_s3_and_presigned_urls_download_without_credentials() {
    let s3 = start_s3("videos");
    let endpoint = s3.endpoint();
    let server = Server::start(Options {
        extra_args: vec!["--store".into(), "s3://videos/wanserve".into()],
        env: s3.env(),
        ..Options::default()
    });
    let id = server.submit(ALICE, &small_job());
    let done = server.wait_final(ALICE, &id);
    assert_eq!(done["status"], "Succeed", "{done}\n{}", server.log());
    let url = done["results"]["videos"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    // A SigV4 presigned URL on the S3 server, never longer than the video's retention.
    assert!(url.starts_with(&endpoint), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    let expires: u64 = url
        .split(['?', '&'])
        .find_map(|p| p.strip_prefix("X-Amz-Expires="))
        .and_then(|v| v.parse().ok())
        .expect("X-Amz-Expires");
    assert!(expires <= 3600, "{expires}");

    // The object is in the bucket under the prefix; nothing else is.
    assert_eq!(s3.objects("videos"), [format!("videos/wanserve/{id}.mp4")]);

    // Downloaded with no credentials at all.
    let response = reqwest::blocking::get(&url).expect("presigned GET");
    assert_eq!(response.status(), 200);
    let dir = tempfile::tempdir().expect("temp");
    let file = dir.path().join("video.mp4");
    std::fs::write(&file, response.bytes().expect("body")).expect("write");
    let (codec, width, height, _, frames, _) = common::probe(&file);
    assert_eq!(
        (codec.as_str(), width, height, frames),
        ("h264", 832, 480, 24)
    );

    // A tampered signature is refused by the S3 server.
    let (head, signature) = url.split_once("X-Amz-Signature=").expect("signature");
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    let tampered = format!("{head}X-Amz-Signature={flipped}{}", &signature[1..]);
    let response = reqwest::blocking::get(&tampered).expect("sent");
    assert_eq!(response.status(), 403);

    // Each status call signs afresh: a later call's URL is signed at its own time (S3 dates
    // have whole seconds, so the second call comes over a second later), and it downloads.
    let signed_at = |url: &str| {
        url.split("X-Amz-Date=")
            .nth(1)
            .and_then(|rest| rest.split('&').next())
            .expect("X-Amz-Date")
            .to_string()
    };
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again: Value = server.status(ALICE, &id);
    let later = again["results"]["videos"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    assert!(signed_at(&later) > signed_at(&url), "{url} then {later}");
    assert_ne!(
        later.split_once("X-Amz-Signature=").map(|p| p.1),
        Some(signature)
    );
    assert_eq!(reqwest::blocking::get(&later).expect("GET").status(), 200);
    // /ready checks that the bucket is writable.
    let ready: Value = server
        .client()
        .get(format!("{}/ready", server.url))
        .send()
        .expect("ready")
        .json()
        .expect("JSON");
    assert_eq!(ready["store"], true);
}

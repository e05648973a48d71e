//! The OpenAPI document against the running server, by Schemathesis (installed by
//! `scripts/setup --for-tests`): thousands of generated requests, valid and not, with an API
//! key and with the admin key; no 5xx, every status, content type, header and body as documented.

use crate::harness::{ADMIN, ALICE, Options, Server, plugin_dir};
use std::path::PathBuf;
use std::process::Command;

/// Must match `schemathesis_version` in scripts/setup.
const SCHEMATHESIS: &str = "schemathesis-4.32.5";

fn schemathesis() -> PathBuf {
    wanserve::home::wanserve_home()
        .expect("a home directory")
        .join("tools")
        .join(SCHEMATHESIS)
        .join("bin/st")
}

/// Runs `st run` with `args`; returns how many test cases it generated (it fails the test on
/// any finding, printing Schemathesis's report).
fn run(server: &Server, key: &str, args: &[&str]) -> u64 {
    let out = Command::new(schemathesis())
        .arg("run")
        .arg(format!("{}/openapi.json", server.url))
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance,response_headers_conformance",
        ])
        // Fixed seed: a failure here reproduces with the same command.
        .args(["--seed", "1", "--request-timeout", "10"])
        .args(args)
        .env("NO_COLOR", "1")
        .current_dir(server.data_dir.parent().expect("temp dir"))
        .output()
        .expect("Schemathesis runs (scripts/setup --for-tests installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    report
        .lines()
        .find_map(|l| l.trim().strip_suffix(" generated")?.trim().parse().ok())
        .or_else(|| {
            report.lines().find_map(|l| {
                let (n, rest) = l.trim().split_once(' ')?;
                rest.starts_with("generated").then(|| n.parse().ok())?
            })
        })
        .unwrap_or_else(|| panic!("no count of generated cases in:\n{report}"))
}

#[test]
fn generated_requests_get_documented_answers_and_never_a_server_error() {
    // Valid submits create jobs: one slot and a short queue keep them from taking the machine.
    let server = Server::start(Options {
        slots: Some(1),
        queue_limit: Some(20),
        ..Options::default()
    });
    // The API with a key. Uploading a plugin (the only PUT) takes a component's bytes, which
    // Schemathesis cannot make: admin.rs's tests cover it.
    let api = run(
        &server,
        ALICE,
        &["--exclude-method", "PUT", "--max-examples", "200"],
    );
    // The admin API with the admin key.
    let admin = run(
        &server,
        ADMIN,
        &[
            "--include-path-regex",
            "^/admin",
            "--exclude-method",
            "PUT",
            "--max-examples",
            "100",
        ],
    );
    eprintln!("schemathesis: {api} cases on the API, {admin} on the admin API");
    assert!(api + admin >= 2000, "only {api} + {admin} cases");
    // Generated bodies and parameters never crashed a handler into a bare 500 either.
    assert!(!server.log().contains("internal error"), "{}", server.log());
}

/// Must match `openapi_client_version` in scripts/setup.
const OPENAPI_CLIENT: &str = "openapi-python-client-0.29.1";

/// What a Python user does with a client generated from `/openapi.json` (the generator and the
/// libraries generated clients import are installed by `scripts/setup --for-tests`).
const PYTHON_FLOW: &str = r#"
import hashlib, json, sys, time
from urllib.parse import urlparse, parse_qs
from wanserve_client import AuthenticatedClient, Client
from wanserve_client.api.video import submit, status, video
from wanserve_client.api.admin import upload
from wanserve_client.models import SubmitBody, JobRef
from wanserve_client.types import File

base, key, admin_key, wasm_path, out_path = sys.argv[1:6]
api = AuthenticatedClient(base_url=base, token=key)
job = submit.sync(client=api, body=SubmitBody(
    model="Wan2.1-T2V-1.3B", prompt="A beautiful sunset over the mountains",
    image_size="832x480", num_frames=24, guidance_scale=5.0, infer_steps=20, seed=7))
assert hasattr(job, "request_id"), job
deadline = time.time() + 120
while True:
    st = status.sync(client=api, body=JobRef(request_id=job.request_id))
    if st.status.value in ("Succeed", "Failed", "Cancelled") or time.time() > deadline:
        break
    time.sleep(0.2)
assert st.status.value == "Succeed", st
url = urlparse(st.results.videos[0].url)
query = parse_qs(url.query)
downloaded = video.sync_detailed(
    url.path.removeprefix("/videos/"), client=Client(base_url=base),
    expires=int(query["expires"][0]), sig=query["sig"][0])
assert downloaded.status_code == 200, downloaded
assert downloaded.parsed is not None, "the generated client dropped the video"
with open(out_path, "wb") as out:
    out.write(downloaded.parsed.payload.read())
with open(wasm_path, "rb") as component:
    installed = upload.sync_detailed(
        "validate", client=AuthenticatedClient(base_url=base, token=admin_key),
        body=File(payload=component, file_name="validate.wasm", mime_type="application/wasm"))
assert installed.status_code == 200, installed
print(json.dumps({"url": st.results.videos[0].url, "sha256": installed.parsed.sha256}))
"#;

/// A client generated by openapi-python-client from `/openapi.json` submits a job, downloads its
/// video and uploads a plugin: the binary bodies are declared as binary (`format: binary`,
/// with a media type such clients read), so neither operation is dropped from the client.
#[test]
fn a_generated_python_client_downloads_a_video_and_uploads_a_plugin() {
    let server = Server::start(Options::default());
    let work = server.data_dir.parent().expect("temp dir").to_path_buf();
    let document = server
        .client()
        .get(format!("{}/openapi.json", server.url))
        .send()
        .expect("openapi.json")
        .text()
        .expect("openapi.json text");
    let document_path = work.join("openapi.json");
    std::fs::write(&document_path, document).expect("write the document");
    let tools = wanserve::home::wanserve_home()
        .expect("a home directory")
        .join("tools")
        .join(OPENAPI_CLIENT)
        .join("bin");
    let generated = work.join("generated-client");
    let out = Command::new(tools.join("openapi-python-client"))
        .arg("generate")
        .arg("--path")
        .arg(&document_path)
        .arg("--output-path")
        .arg(&generated)
        .env("NO_COLOR", "1")
        .current_dir(&work)
        .output()
        .expect("openapi-python-client runs (scripts/setup --for-tests installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    for operation in ["PUT /admin/plugins/{slot}", "GET /videos/{key}"] {
        let dropped = said
            .lines()
            .any(|l| l.contains(operation) && l.contains("will not be generated"))
            || said.contains("response will be omitted");
        assert!(!dropped, "{operation} dropped from the client:\n{said}");
    }
    let wasm = plugin_dir().join("validate_seed.wasm");
    let video_path = work.join("downloaded.mp4");
    let run = Command::new(tools.join("python"))
        .arg("-c")
        .arg(PYTHON_FLOW)
        .args([server.url.as_str(), ALICE, ADMIN])
        .arg(&wasm)
        .arg(&video_path)
        .env("PYTHONPATH", &generated)
        .output()
        .expect("python runs");
    assert!(
        run.status.success(),
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_slice(&run.stdout).expect("the flow's JSON line");
    // The bytes downloaded are the stored video's, whole.
    let stored = server.stored_videos();
    assert_eq!(stored.len(), 1);
    let downloaded = std::fs::read(&video_path).expect("downloaded video");
    assert_eq!(downloaded, std::fs::read(&stored[0]).expect("stored video"));
    assert!(downloaded.len() > 1000 && &downloaded[4..8] == b"ftyp");
    // The media types the document lists for it: `video/mp4`, or what an `Accept` asks for.
    let url = result["url"].as_str().expect("the video URL");
    for (accept, served) in [
        (None, "video/mp4"),
        (Some("application/octet-stream"), "application/octet-stream"),
        (Some("application/octet-stream, video/*;q=0.5"), "video/mp4"),
        (Some("text/html"), "video/mp4"),
    ] {
        let mut request = server.client().get(url);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = request.send().expect("video");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            served,
            "Accept: {accept:?}"
        );
    }
    // The component uploaded is the one serving.
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(
            std::fs::read(&wasm).expect("component"),
        ))
    };
    assert_eq!(result["sha256"], sha.as_str(), "{result}");
    let plugins: serde_json::Value = server
        .client()
        .get(format!("{}/admin/plugins", server.url))
        .bearer_auth(ADMIN)
        .send()
        .expect("admin list")
        .json()
        .expect("admin list JSON");
    assert!(plugins.to_string().contains(&sha), "{plugins}");
}

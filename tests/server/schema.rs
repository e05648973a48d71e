//! The OpenAPI document against the running server, by Schemathesis (installed by
//! `scripts/setup --for-tests`): thousands of generated requests, valid and not, with an API
//! key and with the admin key; no 5xx, every status, content type, header and body as documented.

use crate::harness::{ADMIN, ALICE, Options, Server};
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

//! The admin API as an operator meets it: swaps that survive a restart, the history and rollback
//! by digest, the audit lines, clear refusals, and configuration checked before the model.

use crate::common;
use crate::harness::{ADMIN, ALICE, Options, Server};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub(crate) fn admin(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let response = server
        .client()
        .request(method, format!("{}{path}", server.url))
        .bearer_auth(ADMIN)
        .body(body)
        .send()
        .expect("sent");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

pub(crate) fn serving(server: &Server, slot: &str) -> String {
    let (_, listed) = admin(server, reqwest::Method::GET, "/admin/plugins", vec![]);
    listed["plugins"]
        .as_array()
        .expect("list")
        .iter()
        .find(|p| p["slot"] == slot)
        .expect("slot")["sha256"]
        .as_str()
        .expect("sha256")
        .to_string()
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn a_swap_survives_a_restart_and_rolls_back_by_digest_with_an_audit_trail() {
    let mut server = Server::start(Options::default());
    let seed = serving(&server, "validate");
    let (status, history) = admin(
        &server,
        reqwest::Method::GET,
        "/admin/plugins/validate/history",
        vec![],
    );
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["history"][0]["sha256"], seed.as_str(), "{history}");
    assert_eq!(history["history"][0]["source"], "file", "{history}");

    // An unknown slot is no such slot, not "no such job".
    let (status, body) = admin(
        &server,
        reqwest::Method::PUT,
        "/admin/plugins/frobnicate",
        b"x".to_vec(),
    );
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no such slot"),
        "{body}"
    );

    // A refused upload: one readable line, and an audit line naming its digest and the peer.
    let junk = b"\0asm\x01\0\0\0 not really".to_vec();
    let (status, body) = admin(
        &server,
        reqwest::Method::PUT,
        "/admin/plugins/validate",
        junk.clone(),
    );
    assert_eq!(status, 422, "{body}");
    let reason = body["error"]["fields"][0]["reason"]
        .as_str()
        .expect("reason");
    assert!(!reason.contains('\n') && reason.len() <= 310, "{reason:?}");
    let refused = server
        .log_line(|l| l.contains("admin action") && l.contains(&sha256(&junk)))
        .expect("an audit line for the refused upload");
    assert!(
        refused.contains("refused") && refused.contains("127.0.0.1"),
        "{refused}"
    );

    // An accepted upload serves, is audited, and is what the slot loads after a restart.
    let permissive = std::fs::read(common::plugin_wasm("test-permissive")).expect("component");
    let (status, body) = admin(
        &server,
        reqwest::Method::PUT,
        "/admin/plugins/validate",
        permissive.clone(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sha256"], sha256(&permissive).as_str());
    let accepted = server
        .log_line(|l| l.contains("admin action") && l.contains(&sha256(&permissive)))
        .expect("an audit line for the accepted upload");
    assert!(
        accepted.contains("accepted") && accepted.contains("upload"),
        "{accepted}"
    );
    assert!(
        server
            .metrics()
            .contains("wanserve_admin_actions_total{action=\"upload\",outcome=\"refused\"} 1")
    );

    server.terminate();
    server.launch();
    assert_eq!(
        serving(&server, "validate"),
        sha256(&permissive),
        "the swap survived the restart"
    );
    let loaded = server
        .log_line(|l| l.contains("plugin slot installed") && l.contains("stored swap"))
        .expect("the start-up log names the slot's source");
    assert!(loaded.contains(&sha256(&permissive)), "{loaded}");
    assert!(
        server
            .log_line(|l| l.contains("plugin directory"))
            .is_some()
    );

    let (_, history) = admin(
        &server,
        reqwest::Method::GET,
        "/admin/plugins/validate/history",
        vec![],
    );
    let entries = history["history"].as_array().expect("entries");
    assert_eq!(entries.len(), 2, "{history}");
    assert_eq!(
        (
            entries[0]["source"].as_str(),
            entries[0]["current"].as_bool()
        ),
        (Some("upload"), Some(true))
    );
    assert_eq!(entries[1]["sha256"], seed.as_str());

    // By digest; an unknown digest is refused with the field; nothing is earlier than the seed.
    let (status, body) = admin(
        &server,
        reqwest::Method::POST,
        &format!("/admin/plugins/validate/rollback?sha256={seed}"),
        vec![],
    );
    assert_eq!(
        (status, body["sha256"].as_str()),
        (200, Some(seed.as_str())),
        "{body}"
    );
    let (status, body) = admin(
        &server,
        reqwest::Method::POST,
        &format!("/admin/plugins/validate/rollback?sha256={}", "0".repeat(64)),
        vec![],
    );
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["fields"][0]["field"], "sha256", "{body}");
    let (status, body) = admin(
        &server,
        reqwest::Method::POST,
        "/admin/plugins/validate/rollback",
        vec![],
    );
    assert_eq!(status, 409, "{body}");

    // The rollback is what a restart keeps, too.
    server.terminate();
    server.launch();
    assert_eq!(serving(&server, "validate"), seed);
    server.submit(ALICE, &crate::harness::small_job());

    // An upload that cannot be stored (here the history is a directory, not a file) does not
    // serve either: a restart would not find it.
    server.terminate();
    let history_file = server.data_dir.join("plugin-swaps/validate/history.json");
    std::fs::remove_file(&history_file).expect("remove the history");
    std::fs::create_dir(&history_file).expect("a directory in its place");
    server.launch();
    let (status, body) = admin(
        &server,
        reqwest::Method::PUT,
        "/admin/plugins/validate",
        permissive.clone(),
    );
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("cannot be stored"), "{body}");
    assert_eq!(serving(&server, "validate"), seed, "nothing changed");
}

/// An admin key that is too short stops the server before it opens the model (here a model
/// directory that does not exist: its error would come first otherwise), naming the variable;
/// so do a store URL and a queue URL it cannot use.
#[test]
fn bad_settings_fail_before_the_plugins_and_the_model_and_name_the_variable() {
    let data = tempfile::tempdir().expect("temp dir");
    let (error, stderr) = crate::harness::start_refused(
        data.path(),
        |command| {
            command
                .args(["--model-dir", "/nonexistent/model"])
                .env("WANSERVE_ADMIN_KEY", "short-key");
        },
        "the server kept running with a short admin key",
    );
    assert!(
        error.contains("WANSERVE_ADMIN_KEY") && error.contains("16"),
        "{error}"
    );
    assert!(
        !stderr.contains("plugin slot installed"),
        "the plugins loaded first: {stderr}"
    );
    assert!(
        !stderr.contains("short-key"),
        "the key itself was printed: {stderr}"
    );

    // So are a store URL and a queue URL the server cannot use, and an unreachable queue:
    // each names its flag and variable, before the plugins and the model.
    for (flag, value, wanted) in [
        ("--store", "ftp://videos", "--store / WANSERVE_STORE"),
        ("--queue", "mysql://db/wanserve", "--queue / WANSERVE_QUEUE"),
        (
            "--queue",
            "postgres://nobody@127.0.0.1:1/none",
            "--queue / WANSERVE_QUEUE: cannot open",
        ),
    ] {
        let (error, stderr) = crate::harness::start_refused(
            data.path(),
            |command| {
                command
                    .args(["--model-dir", "/nonexistent/model", flag, value])
                    .env("WANSERVE_ADMIN_KEY", ADMIN);
            },
            "the server kept running with a URL it cannot use",
        );
        assert!(error.contains(wanted), "{flag} {value}: {error}");
        assert!(
            !stderr.contains("plugin slot installed"),
            "the plugins loaded first: {stderr}"
        );
    }
}

/// The fenced blocks of `language` in `text`, in order.
fn fenced<'a>(text: &'a str, language: &str) -> Vec<&'a str> {
    let opening = format!("```{language}\n");
    text.split(opening.as_str())
        .skip(1)
        .filter_map(|rest| rest.split("\n```").next())
        .collect()
}

/// plugins/README.md's walk-through ("Start from nothing"), run as written: the server gets its
/// config block, then its shell blocks run in a scratch directory with `wanserve` on the path
/// and the admin key in the environment (only the port differs from the text's 8088): a
/// validator from nothing builds, checks, is swapped in and refuses what it should, and the
/// rollback brings the default back.
#[test]
fn the_plugin_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(common::repo_root().join("plugins/README.md"))
        .expect("plugins/README.md");
    let section = readme
        .split("## Start from nothing")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the walk-through section");
    let config = fenced(section, "toml");
    let shell = fenced(section, "sh");
    assert_eq!((config.len(), shell.len()), (1, 2), "{section}");
    let server = Server::start(Options {
        toml: format!("{}\n", config[0]),
        ..Options::default()
    });
    let scratch = tempfile::tempdir().expect("temp dir");
    let binary = std::path::PathBuf::from(env!("CARGO_BIN_EXE_wanserve"));
    let path = format!(
        "{}:{}",
        binary.parent().expect("bin dir").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |block: &str| {
        let script = block.replace("http://localhost:8088", &server.url);
        let out = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(scratch.path())
            .env("PATH", &path)
            .env("WANSERVE_ADMIN_KEY", ADMIN)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .output()
            .expect("bash runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{script}\n{text}");
        text
    };
    let submit = |prompt: &str, frames: u32| {
        let mut body = crate::harness::small_job();
        body["prompt"] = prompt.into();
        body["num_frames"] = frames.into();
        let response = server.post("/video/submit", Some(ALICE), &body);
        let status = response.status().as_u16();
        (status, response.json::<Value>().unwrap_or(Value::Null))
    };
    let refused_field = |(status, body): (u16, Value)| {
        assert_eq!(status, 422, "{body}");
        body["error"]["fields"][0]["field"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };

    let (status, _) = submit("A volcano erupting at night, lava flowing", 49);
    assert_eq!(status, 202, "the default knows no banned word");
    let out = run(shell[0]);
    assert!(out.contains("self-test: passed"), "{out}");
    assert_eq!(
        refused_field(submit("A volcano erupting at night, lava flowing", 49)),
        "prompt"
    );
    assert_eq!(
        refused_field(submit("A calm lake at dawn, mist", 50)),
        "num_frames"
    );
    assert_eq!(submit("A calm lake at dawn, mist", 49).0, 202);
    // The default's own rules still hold (the seed allows 24 frames at least).
    assert_eq!(
        refused_field(submit("A calm lake at dawn, mist", 23)),
        "num_frames"
    );

    let out = run(shell[1]);
    assert!(
        out.contains("\"upload\""),
        "the history names the upload: {out}"
    );
    let (status, _) = submit("A volcano erupting at night, lava flowing", 49);
    assert_eq!(status, 202, "rolled back to the default");
}

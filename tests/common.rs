//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn wanserve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wanserve"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn tiny_model() -> PathBuf {
    repo_root().join("models").join("tiny")
}

/// A writable copy of the bundled model, for tests that alter or break it.
pub fn tiny_model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(tiny_model()).expect("bundled model") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

/// `ffprobe` of the first video stream: (codec, width, height, frame rate, frame count, pix_fmt).
pub fn probe(path: &Path) -> (String, usize, usize, String, usize, String) {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
        ])
        .arg("stream=codec_name,width,height,r_frame_rate,nb_read_frames,pix_fmt")
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
        .expect("ffprobe runs (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {text}"))
            .to_string()
    };
    (
        field("codec_name"),
        field("width").parse().unwrap(),
        field("height").parse().unwrap(),
        field("r_frame_rate"),
        field("nb_read_frames").parse().unwrap(),
        field("pix_fmt"),
    )
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Builds the components in plugins/ (once per test binary) and returns the path of one.
/// The build runs in plugins/ so that plugins/.cargo/config.toml (target, linker) applies.
pub fn plugin_wasm(crate_name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| build_plugins(&[]));
    repo_root()
        .join("plugins/target/wasm32-unknown-unknown/release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")))
}

/// Builds one plugin crate for wasm32-wasip2 (where Rust's std imports WASI interfaces) and
/// returns its path: the host must accept such components too.
pub fn plugin_wasm_wasip2(crate_name: &str) -> PathBuf {
    build_plugins(&["--target", "wasm32-wasip2", "--package", crate_name]);
    repo_root()
        .join("plugins/target/wasm32-wasip2/release")
        .join(format!("{}.wasm", crate_name.replace('-', "_")))
}

fn build_plugins(extra: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(repo_root().join("plugins"))
        .args(["build", "--quiet", "--release", "--locked"])
        .args(extra)
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building plugins/ {extra:?} failed (scripts/setup adds the wasm32 targets)"
    );
}

/// A caller for plugin calls that do not depend on who calls.
pub fn plugin_caller() -> wanserve::plugins::Principal {
    wanserve::plugins::Principal {
        id: "test".into(),
        display_name: "Test".into(),
        attributes: vec![],
    }
}

/// The seed document's example submit body: every field valid.
pub fn valid_submit_body() -> serde_json::Map<String, serde_json::Value> {
    match serde_json::json!({
        "model": "Wan2.1-T2V-1.3B", "prompt": "A beautiful sunset over the mountains",
        "image_size": "480x832", "num_frames": 81, "guidance_scale": 5.0, "infer_steps": 50, "seed": 42
    }) {
        serde_json::Value::Object(body) => body,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Signed (and unsigned) JWTs for the auth tests, with the keys in `tests/fixtures/jwt`.
pub mod jwt {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};

    pub fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// `sub`, `exp` `exp_in` seconds from now (negative: already expired), and `extra`.
    pub fn claims(sub: &str, exp_in: i64, extra: serde_json::Value) -> serde_json::Value {
        let mut claims = serde_json::json!({"sub": sub, "exp": (now() as i64 + exp_in)});
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        claims
    }

    pub fn hs256(claims: &serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("HS256 signs")
    }

    pub fn rs256(claims: &serde_json::Value, private_pem: &str) -> String {
        encode(
            &Header::new(Algorithm::RS256),
            claims,
            &EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("fixture key"),
        )
        .expect("RS256 signs")
    }

    /// A PEM from `tests/fixtures/jwt`.
    pub fn fixture(name: &str) -> String {
        std::fs::read_to_string(super::repo_root().join("tests/fixtures/jwt").join(name))
            .expect("fixture")
    }

    /// base64url without padding, as JWT parts are written.
    pub fn b64(text: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    /// `{"alg":"none"}` over `claims`, with an empty signature.
    pub fn unsigned(claims: &serde_json::Value) -> String {
        format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&claims.to_string())
        )
    }
}

/// The bundled model made few-step by `models/few_step.py` with `preset` (`fastwan`,
/// `lightx2v`), written to `dir`.
pub fn few_step_model_dir(dir: &Path, preset: &str) {
    let made = Command::new("python3")
        .arg(repo_root().join("models/few_step.py"))
        .arg(tiny_model())
        .arg("--out")
        .arg(dir)
        .args(["--preset", preset])
        .output()
        .expect("python3 runs");
    assert!(made.status.success(), "{}", stderr(&made));
}

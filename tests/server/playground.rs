//! The playground in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven
//! over WebDriver): submit a job from the page, watch the progress bar advance, play the video
//! (its duration and size read back from the element), and see the server's 422 message under
//! the field. A screenshot is kept in `target/test-artifacts/playground.png`.

use crate::common;
use crate::harness::{ALICE, Options, Server};
use crate::s3::free_port;
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_chromedriver() -> Driver {
    let port = free_port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver runs (scripts/setup --for-tests installs chromium-driver)");
    crate::harness::wait_for_port(port, "chromedriver");
    Driver { child, port }
}

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,1400", "--autoplay-policy=no-user-gesture-required"]
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a Chromium session")
}

/// Runs `script` (a function body) in the page until it returns something other than null.
async fn wait_until(browser: &Client, script: &str, timeout: Duration, what: &str) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let value = browser.execute(script, vec![]).await.expect("script runs");
        if !value.is_null() {
            return value;
        }
        if Instant::now() > deadline {
            let state = browser
                .execute(
                    "return document.getElementById('job-state').textContent + ' | ' + \
                     document.getElementById('job-detail').textContent + ' | ' + \
                     document.getElementById('form-error').textContent",
                    vec![],
                )
                .await
                .unwrap_or_default();
            panic!("{what}: not seen in {timeout:?} (page: {state})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fill(browser: &Client, values: Value) {
    browser
        .execute(
            "for (const [id, value] of Object.entries(arguments[0])) {
                 const input = document.getElementById(id);
                 input.value = value;
                 input.dispatchEvent(new Event('input'));
                 input.dispatchEvent(new Event('change'));
             }",
            vec![values],
        )
        .await
        .expect("fill the form");
}

#[test]
fn the_playground_submits_follows_and_plays_a_job() {
    let server = Server::start(Options::default());
    // Every asset carries the Content-Security-Policy (scripts, styles and requests only from
    // this server) and nosniff; the page below runs under it in Chromium.
    for (path, kind) in [
        ("/", "text/html"),
        ("/playground/playground.js", "text/javascript"),
        ("/playground/playground.css", "text/css"),
    ] {
        let response = server.get(path);
        assert_eq!(response.status(), 200, "{path}");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(header("content-type").starts_with(kind), "{path}");
        let csp = header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(
                csp.contains(directive),
                "{path}: {directive} missing from {csp:?}"
            );
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
    }
    let driver = start_chromedriver();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let browser = browser(&driver).await;
        browser
            .goto(&format!("{}/", server.url))
            .await
            .expect("the page");
        assert_eq!(browser.title().await.expect("title"), "wanserve playground");

        fill(
            &browser,
            json!({"api-key": ALICE, "prompt": "A beautiful sunset over the mountains",
                   "num_frames": "24", "infer_steps": "20", "seed": "7"}),
        )
        .await;
        // The model picker lists what GET /models says this server serves.
        let listed = wait_until(
            &browser,
            "return document.getElementById('model').dataset.listed || null;",
            Duration::from_secs(20),
            "the model list",
        )
        .await;
        assert_eq!(listed, "Wan2.1-T2V-1.3B");
        browser
            .execute("document.getElementById('submit').click()", vec![])
            .await
            .expect("submit");

        // Progress advances: a denoising step above 0 appears on the bar.
        let step = wait_until(
            &browser,
            "const p = document.getElementById('progress');
             return p.dataset.stage === 'denoising' && Number(p.dataset.step) > 0
                 ? Number(p.dataset.step) : null;",
            Duration::from_secs(120),
            "a denoising step on the progress bar",
        )
        .await;
        assert!(step.as_u64() > Some(0));

        // A live preview shows while the job runs (every 5th step by default): a PNG of the
        // latents' size, 104x60 for 832x480, put away once the video is there.
        let preview = wait_until(
            &browser,
            "const i = document.getElementById('preview');
             return i.dataset.step && i.complete && i.naturalWidth > 0
                 ? {step: Number(i.dataset.step), width: i.naturalWidth, height: i.naturalHeight,
                    png: i.src.startsWith('data:image/png;base64,')}
                 : null;",
            Duration::from_secs(120),
            "a live preview",
        )
        .await;
        assert_eq!(preview["width"], 104, "{preview}");
        assert_eq!(preview["height"], 60, "{preview}");
        assert_eq!(preview["png"], true, "{preview}");
        assert!(
            [5, 10, 15, 20].contains(&preview["step"].as_u64().unwrap_or(0)),
            "{preview}"
        );

        // The video plays: metadata loaded, 24 frames at 16 fps, 832x480, time moving.
        let video = wait_until(
            &browser,
            "const v = document.getElementById('video');
             return !v.hidden && v.readyState >= 2 && v.currentTime > 0
                 ? {duration: v.duration, width: v.videoWidth, height: v.videoHeight,
                    src: v.currentSrc, state: document.getElementById('job-state').textContent}
                 : null;",
            Duration::from_secs(120),
            "the video playing",
        )
        .await;
        assert_eq!(video["width"], 832, "{video}");
        assert_eq!(video["height"], 480, "{video}");
        let duration = video["duration"].as_f64().expect("duration");
        assert!((duration - 24.0 / 16.0).abs() < 0.1, "{video}");
        assert_eq!(video["state"], "Done");
        let preview_hidden = browser
            .execute("return document.getElementById('preview').hidden", vec![])
            .await
            .expect("script");
        assert_eq!(preview_hidden, true, "the video takes the preview's place");
        // The job is in the recent list.
        let recent = browser
            .execute(
                "return document.querySelectorAll('#recent-list li[data-id]').length",
                vec![],
            )
            .await
            .expect("recent");
        assert_eq!(recent, 1);

        let screenshot = browser.screenshot().await.expect("screenshot");
        let artifacts = common::repo_root().join("target/test-artifacts");
        std::fs::create_dir_all(&artifacts).expect("artifacts dir");
        std::fs::write(artifacts.join("playground.png"), screenshot).expect("screenshot saved");

        // A value the page would stop (its range removed, as an operator's different plugin or
        // a stale page could): the server's 422 message appears under the field.
        browser
            .execute(
                "document.getElementById('num_frames').removeAttribute('max');",
                vec![],
            )
            .await
            .expect("script");
        fill(&browser, json!({"num_frames": "500"})).await;
        browser
            .execute("document.getElementById('submit').click()", vec![])
            .await
            .expect("submit");
        let message = wait_until(
            &browser,
            "const e = document.querySelector('[data-error-for=num_frames]').textContent;
             return e ? e : null;",
            Duration::from_secs(30),
            "the 422 message under num_frames",
        )
        .await;
        assert!(
            message.as_str().is_some_and(|m| m.contains("120")),
            "{message}"
        );
        let invalid = browser
            .execute(
                "return document.getElementById('num_frames').getAttribute('aria-invalid')",
                vec![],
            )
            .await
            .expect("script");
        assert_eq!(invalid, "true");
        browser.close().await.expect("close");
    });
}

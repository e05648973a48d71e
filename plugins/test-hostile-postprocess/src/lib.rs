//! A postprocess plugin that misbehaves as each job's prompt asks, for the server's tests that
//! no video is lost: a prompt containing `decide-loop`, `decide-trap`, `decide-grow` or
//! `decide-huge` (a 1 MiB object key) breaks `decide`; one containing `retain-loop`,
//! `retain-trap` or `retain-grow` gets a sound policy (1 s retention) whose metadata makes
//! `retain` break later; `retain-delete` is deleted when its retention ends, as a control.
wit_bindgen::generate!({ path: "../../wit", world: "postprocess-plugin" });

use exports::wanserve::policy::postprocess::{
    FinishedJob, Guest as Postprocess, OutputPolicy, RetentionDecision, StoredVideo,
};

struct Component;

fn misbehave(mode: &str) -> ! {
    match mode {
        "loop" => {
            let mut n = mode.len() as u64;
            loop {
                n = std::hint::black_box(n.wrapping_mul(6_364_136_223_846_793_005) | 1);
            }
        }
        "grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        _ => panic!("test-hostile-postprocess traps"),
    }
}

impl Postprocess for Component {
    fn decide(job: FinishedJob) -> OutputPolicy {
        let prompt = &job.request.prompt;
        if prompt.contains("decide-huge") {
            return OutputPolicy {
                object_key: "k".repeat(1 << 20),
                retention_seconds: 60,
                metadata: vec![],
            };
        }
        for mode in ["loop", "trap", "grow"] {
            if prompt.contains(&format!("decide-{mode}")) {
                misbehave(mode);
            }
        }
        let retain = ["loop", "trap", "grow", "delete"]
            .into_iter()
            .find(|mode| prompt.contains(&format!("retain-{mode}")))
            .unwrap_or("keep");
        OutputPolicy {
            object_key: format!("{}.mp4", job.request_id),
            retention_seconds: 1,
            metadata: vec![("retain".into(), retain.into())],
        }
    }

    fn retain(video: StoredVideo, _now: u64) -> RetentionDecision {
        match video
            .metadata
            .iter()
            .find(|(k, _)| k == "retain")
            .map(|(_, v)| v.as_str())
        {
            Some("keep") | None => RetentionDecision::Keep,
            Some("delete") => RetentionDecision::Delete,
            Some(mode) => misbehave(mode),
        }
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);

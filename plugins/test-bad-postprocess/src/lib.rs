//! A postprocess plugin gone wrong: `decide` names an object key outside the store, `retain`
//! traps. The host must refuse the key and keep the video.
wit_bindgen::generate!({ path: "../../wit", world: "postprocess-plugin" });

use exports::wanserve::policy::postprocess::{
    FinishedJob, Guest as Postprocess, OutputPolicy, RetentionDecision, StoredVideo,
};

struct Component;

impl Postprocess for Component {
    fn decide(job: FinishedJob) -> OutputPolicy {
        OutputPolicy {
            object_key: format!("../../etc/{}.mp4", job.request_id),
            retention_seconds: 1,
            metadata: vec![],
        }
    }

    fn retain(_: StoredVideo, _: u64) -> RetentionDecision {
        panic!("test-bad-postprocess always traps in retain");
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);

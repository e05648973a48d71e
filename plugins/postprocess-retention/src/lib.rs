//! The default postprocess plugin: a finished video is stored as `<request-id>.mp4` and kept for
//! `retention_seconds` (default 3600), `retention_seconds.<tier>` for callers of that tier; the
//! sweeper deletes it once its recorded expiry has passed. The rules are
//! `wanserve_policy::retention` (see there); this plugin is exactly them.

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

wit_bindgen::generate!({
    path: "../../wit",
    world: "postprocess-plugin",
    with: {
        "wanserve:policy/types@0.1.0": wanserve_policy::types,
        "wanserve:policy/host@0.1.0": wanserve_policy::host,
    },
});

use exports::wanserve::policy::postprocess::{
    FinishedJob, Guest as Postprocess, OutputPolicy, RetentionDecision, StoredVideo,
};
use wanserve_policy::retention;

struct Component;

impl Postprocess for Component {
    fn decide(job: FinishedJob) -> OutputPolicy {
        OutputPolicy {
            object_key: retention::object_key(&job.request_id),
            retention_seconds: retention::retention_seconds(&job.caller),
            metadata: retention::metadata(&job.caller, &job.request),
        }
    }

    fn retain(video: StoredVideo, now: u64) -> RetentionDecision {
        if retention::expired(video.expires_at, now) {
            RetentionDecision::Delete
        } else {
            RetentionDecision::Keep
        }
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        retention::self_test()
    }
}

export!(Component);

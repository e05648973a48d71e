//! The default auth plugin: Bearer credentials (RFC 6750 over RFC 7235's Authorization header),
//! API keys hashed and compared in constant time, JWTs verified by the host, public paths. The
//! rules and their config are `wanserve_policy::auth` (see there); this plugin is exactly them,
//! so a plugin built on that library answers as this one does.
//!
//! Denials never echo the credential.

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

wit_bindgen::generate!({
    path: "../../wit",
    world: "auth-plugin",
    with: {
        "wanserve:policy/types@0.1.0": wanserve_policy::types,
        "wanserve:policy/host@0.1.0": wanserve_policy::host,
    },
});

use exports::wanserve::policy::auth::{Denial, Guest as Auth, HttpRequest};
use wanserve_policy::auth::{self, Refusal};
use wanserve_policy::types::Principal;

struct Component;

impl Auth for Component {
    fn authenticate(request: HttpRequest) -> Result<Principal, Denial> {
        auth::authenticate(&request.path, &request.headers)
            .map_err(|Refusal { reason, challenge }| Denial { reason, challenge })
    }
}

impl Guest for Component {
    /// Refuses a configuration this plugin could not use, so a typo never replaces a working one.
    fn self_test() -> Result<(), String> {
        auth::self_test()
    }
}

export!(Component);

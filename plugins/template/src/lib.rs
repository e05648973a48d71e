//! A minimal plugin to start from: an auth plugin that admits callers connecting from the
//! machine itself (loopback peers) and refuses everyone else.
//!
//! `wanserve plugin new NAME --slot auth` writes a standalone crate from this file
//! (`template-validate` and `template-postprocess` are the other slots' starts); see its README
//! (or plugins/README.md) for building, checking and deploying.

// Heap inside the initial memory: no memory.grow in an ordinary call (see guest-alloc).
use guest_alloc as _;

// The types and host imports are the guest library's, so its functions fit these exports.
wit_bindgen::generate!({
    path: "../../wit",
    world: "auth-plugin",
    with: {
        "wanserve:policy/types@0.1.0": wanserve_policy::types,
        "wanserve:policy/host@0.1.0": wanserve_policy::host,
    },
});

use exports::wanserve::policy::auth::{Denial, Guest as Auth, HttpRequest};
use wanserve_policy::host;
use wanserve_policy::types::Principal;

struct Component;

/// Whether `peer` ("ip:port" or "[ipv6]:port") is a loopback address.
fn is_loopback(peer: &str) -> bool {
    let ip = match peer.rsplit_once(':') {
        Some((ip, _port)) => ip.trim_start_matches('[').trim_end_matches(']'),
        None => peer,
    };
    ip.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

impl Auth for Component {
    fn authenticate(request: HttpRequest) -> Result<Principal, Denial> {
        if is_loopback(&request.peer) {
            Ok(Principal {
                id: "local".into(),
                display_name: "local user".into(),
                attributes: vec![],
            })
        } else {
            host::log(
                host::LogLevel::Info,
                "refused a remote caller",
                &[("peer".into(), request.peer)],
            );
            Err(Denial {
                reason: "this server only accepts local callers".into(),
                challenge: None,
            })
        }
    }
}

impl Guest for Component {
    /// Run before the plugin is swapped in: check the config and a known answer or two.
    fn self_test() -> Result<(), String> {
        match (
            is_loopback("127.0.0.1:5000"),
            is_loopback("[::1]:80"),
            is_loopback("10.0.0.1:80"),
        ) {
            (true, true, false) => Ok(()),
            answers => Err(format!("loopback detection is wrong: {answers:?}")),
        }
    }
}

export!(Component);

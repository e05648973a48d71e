//! An auth plugin that misbehaves as each request asks, for the server's fail-closed tests: the
//! `x-hostile` header picks `loop` (never returns), `trap`, `grow` (allocates without bound),
//! `huge` (a 1 MiB principal), `crlf` (a challenge that would inject a header). Without the
//! header it lets the request in as `tester`.
wit_bindgen::generate!({ path: "../../wit", world: "auth-plugin" });

use exports::wanserve::policy::auth::{Denial, Guest as Auth, HttpRequest};
use wanserve::policy::types::Principal;

struct Component;

impl Auth for Component {
    fn authenticate(request: HttpRequest) -> Result<Principal, Denial> {
        let mode = request
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("x-hostile"))
            .map(|(_, value)| value.as_str());
        match mode {
            None => Ok(principal("tester".into())),
            Some("loop") => {
                let mut n = request.path.len() as u64;
                loop {
                    n = std::hint::black_box(n.wrapping_mul(6_364_136_223_846_793_005) | 1);
                }
            }
            Some("grow") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            Some("huge") => Ok(principal("x".repeat(1 << 20))),
            Some("crlf") => Err(Denial {
                reason: "no".into(),
                challenge: Some("Bearer realm=\"x\"\r\nSet-Cookie: session=stolen".into()),
            }),
            Some(_) => panic!("test-hostile-auth traps"),
        }
    }
}

fn principal(id: String) -> Principal {
    Principal {
        display_name: id.clone(),
        id,
        attributes: vec![],
    }
}

impl Guest for Component {
    fn self_test() -> Result<(), String> {
        Ok(())
    }
}

export!(Component);

//! An auth plugin that misbehaves as each request asks, for the server's fail-closed tests: the
//! `x-hostile` header picks `loop` (never returns), `trap`, `grow` (allocates without bound),
//! `huge` (a 1 MiB principal), `crlf` (a challenge that would inject a header); and, built for
//! wasm32-wasip2, what it gets from WASI: `wall-clock`, `monotonic-clock` and `random` answer
//! with the value read (the host is meant to trap instead), `hash-map` with a `HashMap`'s
//! iteration order (std seeds it from WASI's `insecure-seed`). Without the header it lets the
//! request in as `tester`.
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
            Some(ambient @ ("wall-clock" | "monotonic-clock" | "random" | "hash-map")) => {
                Ok(principal(wasi::read(ambient)))
            }
            Some("crlf") => Err(Denial {
                reason: "no".into(),
                challenge: Some("Bearer realm=\"x\"\r\nSet-Cookie: session=stolen".into()),
            }),
            Some(_) => panic!("test-hostile-auth traps"),
        }
    }
}

#[cfg(target_os = "wasi")]
mod wasi {
    pub fn read(what: &str) -> String {
        match what {
            "wall-clock" => format!(
                "{:?}",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
            ),
            "monotonic-clock" => format!("{:?}", std::time::Instant::now().elapsed()),
            "random" => {
                let mut bytes = [0u8; 8];
                format!("{:?} {bytes:?}", getrandom::fill(&mut bytes))
            }
            _ => {
                let map: std::collections::HashMap<String, ()> =
                    (0..32).map(|i| (format!("k{i}"), ())).collect();
                map.into_keys().collect::<Vec<_>>().join(",")
            }
        }
    }
}

#[cfg(not(target_os = "wasi"))]
mod wasi {
    pub fn read(what: &str) -> String {
        format!("{what}: built without WASI")
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

//! The default auth plugin (`auth-apikey`) through the host: Bearer parsing, API keys compared
//! in constant time, JWTs verified by the host with the algorithm pinned, the key list seeded
//! from the environment or generated, and keys never written to logs.

mod common;

use common::jwt::{b64, claims, fixture, hs256, now, rs256, unsigned};
use common::plugin_wasm;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use wanserve::plugins::api_keys::{hash_key, seed_api_keys};
use wanserve::plugins::{
    Denial, HttpRequest, PluginError, PluginHost, PluginLimits, Principal, RequestParts, Slot,
};

const ALICE: &str = "alice-key-0123456789abcdef";
const BOB: &str = "bob-key-fedcba9876543210";
const CAROL: &str = "carol-key-00000000000000";
const HMAC_SECRET: &str = "a-test-hmac-secret-of-at-least-32-bytes!";

fn auth_host(config: &[(&str, &str)]) -> PluginHost {
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    host.replace(Slot::Auth, &auth_wasm(), owned(config))
        .unwrap();
    host
}

fn auth_wasm() -> Vec<u8> {
    std::fs::read(plugin_wasm("auth-apikey")).unwrap()
}

fn owned(config: &[(&str, &str)]) -> BTreeMap<String, String> {
    config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn keys_config() -> String {
    format!(
        "alice={},bob={},carol={}",
        hash_key(ALICE),
        hash_key(BOB),
        hash_key(CAROL)
    )
}

fn request(headers: &[(&str, &str)]) -> HttpRequest {
    HttpRequest {
        method: "POST".into(),
        path: "/video/submit".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        peer: "203.0.113.7:40000".into(),
    }
}

fn authenticate(host: &PluginHost, headers: &[(&str, &str)]) -> Result<Principal, Denial> {
    host.authenticate(&request(headers))
        .expect("the plugin runs")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn api_keys_with_rfc7235_scheme_handling() {
    let host = auth_host(&[("api_keys", &keys_config()), ("tier.bob", "premium")]);
    let alice = authenticate(&host, &[("authorization", &bearer(ALICE))]).unwrap();
    assert_eq!(
        (alice.id.as_str(), alice.display_name.as_str()),
        ("key:alice", "alice")
    );
    assert!(
        alice
            .attributes
            .contains(&("tier".into(), "standard".into()))
    );
    let bob = authenticate(&host, &[("authorization", &bearer(BOB))]).unwrap();
    assert!(bob.attributes.contains(&("tier".into(), "premium".into())));

    // The scheme is case-insensitive; one or more spaces separate it from the token.
    for header in [
        format!("bearer {ALICE}"),
        format!("BEARER {ALICE}"),
        format!("Bearer   {ALICE}"),
        format!("  Bearer {ALICE}  "),
    ] {
        let who = authenticate(&host, &[("authorization", &header)]);
        assert_eq!(
            who.map(|p| p.id).ok().as_deref(),
            Some("key:alice"),
            "{header:?}"
        );
    }
    // The header name arrives lower-cased from the server, but a plugin should not depend on it.
    assert!(authenticate(&host, &[("Authorization", &bearer(ALICE))]).is_ok());

    let refused: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![], "required"),
        (vec![("authorization", format!("Basic {ALICE}"))], "Bearer"),
        (vec![("authorization", "Bearer".into())], "empty"),
        (vec![("authorization", "Bearer ".into())], "empty"),
        (vec![("authorization", format!("Bearer{ALICE}"))], "Bearer"),
        (
            vec![("authorization", format!("Bearer {ALICE} extra"))],
            "not a valid token",
        ),
        (
            vec![("authorization", format!("Bearer {ALICE}x"))],
            "not valid",
        ),
        (
            vec![("authorization", format!("Bearer {}", &ALICE[1..]))],
            "not valid",
        ),
        (
            vec![("authorization", "Bearer wrong-key".into())],
            "not valid",
        ),
        (
            vec![
                ("authorization", bearer(ALICE)),
                ("authorization", bearer(BOB)),
            ],
            "more than one",
        ),
    ];
    for (headers, why) in refused {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let denial = authenticate(&host, &headers).expect_err(&format!("{headers:?}"));
        assert!(
            denial.reason.contains(why),
            "{headers:?}: {}",
            denial.reason
        );
        let challenge = denial.challenge.unwrap_or_default();
        assert!(
            challenge.starts_with(r#"Bearer realm="wanserve""#),
            "{challenge}"
        );
        for key in [ALICE, BOB] {
            assert!(!denial.reason.contains(key) && !challenge.contains(key));
        }
    }
}

#[test]
fn keys_are_compared_against_every_configured_hash_without_early_exit() {
    let host = auth_host(&[("api_keys", &keys_config())]);
    // Whichever key matches (first, last, none), the plugin makes the same number of
    // constant-time comparisons: one per configured key.
    for (key, accepted) in [(ALICE, true), (CAROL, true), ("nobody-has-this-key", false)] {
        let before = host.constant_time_compares(Slot::Auth);
        let answer = authenticate(&host, &[("authorization", &bearer(key))]);
        assert_eq!(answer.is_ok(), accepted, "{key}");
        assert_eq!(host.constant_time_compares(Slot::Auth) - before, 3, "{key}");
    }
}

#[test]
fn public_paths_and_a_bad_key_list() {
    let host = auth_host(&[
        ("api_keys", &keys_config()),
        ("public_paths", "/health, /videos/*"),
    ]);
    let mut health = request(&[]);
    health.path = "/health".into();
    assert_eq!(host.authenticate(&health).unwrap().unwrap().id, "anonymous");
    health.path = "/videos/abc.mp4".into();
    assert!(host.authenticate(&health).unwrap().is_ok());
    health.path = "/healthz".into();
    assert!(host.authenticate(&health).unwrap().is_err());

    // A key list the plugin cannot read fails the self-test: the working plugin stays.
    let before = host.installed(Slot::Auth).unwrap();
    let bad = host.replace(
        Slot::Auth,
        &auth_wasm(),
        owned(&[("api_keys", "alice=notahash")]),
    );
    assert!(
        matches!(bad, Err(PluginError::SelfTest(ref m)) if m.contains("not 64 hex digits")),
        "{bad:?}"
    );
    assert_eq!(host.installed(Slot::Auth).unwrap().sha256, before.sha256);
    assert!(authenticate(&host, &[("authorization", &bearer(ALICE))]).is_ok());
}

fn reused(host: &PluginHost, request: &HttpRequest) -> Option<String> {
    host.reused_principal(&RequestParts::of(request))
        .map(|p| p.id)
}

/// An accepted key's principal is reused (no plugin call) for the same path and Authorization
/// only; refusals never are; a new configuration or a rollback starts with nothing reused.
#[test]
fn an_acceptance_is_reused_until_the_plugin_or_its_config_changes() {
    let host = auth_host(&[("api_keys", &keys_config())]);
    let alice = request(&[("authorization", &bearer(ALICE))]);
    assert_eq!(reused(&host, &alice), None, "nothing before a call");
    assert!(host.authenticate(&alice).unwrap().is_ok());
    let compares = host.constant_time_compares(Slot::Auth);
    assert_eq!(reused(&host, &alice).as_deref(), Some("key:alice"));
    assert_eq!(
        host.constant_time_compares(Slot::Auth),
        compares,
        "a reused acceptance calls no plugin"
    );
    // Another peer, same credential: the plugin said its answer does not depend on the peer.
    let mut elsewhere = alice.clone();
    elsewhere.peer = "198.51.100.1:1".into();
    assert_eq!(reused(&host, &elsewhere).as_deref(), Some("key:alice"));
    // Another key, another path, a wrong key (refused, then still not reused).
    assert_eq!(
        reused(&host, &request(&[("authorization", &bearer(BOB))])),
        None
    );
    let mut status = alice.clone();
    status.path = "/video/status".into();
    assert_eq!(reused(&host, &status), None);
    let wrong = request(&[("authorization", &bearer("not-a-key-000000"))]);
    assert!(host.authenticate(&wrong).unwrap().is_err());
    assert_eq!(reused(&host, &wrong), None);

    // Alice's key revoked by a new configuration: refused at once.
    let without_alice = format!("bob={}", hash_key(BOB));
    host.replace(
        Slot::Auth,
        &auth_wasm(),
        owned(&[("api_keys", &without_alice)]),
    )
    .unwrap();
    assert_eq!(reused(&host, &alice), None);
    assert!(host.authenticate(&alice).unwrap().is_err());
    // Rolled back: alice is accepted again, by a call first.
    host.rollback(Slot::Auth).unwrap();
    assert_eq!(reused(&host, &alice), None);
    assert!(host.authenticate(&alice).unwrap().is_ok());
    assert_eq!(reused(&host, &alice).as_deref(), Some("key:alice"));

    // `reuse_ms = 0`: every request is a call; a bad value fails the self-test.
    host.replace(
        Slot::Auth,
        &auth_wasm(),
        owned(&[("api_keys", &keys_config()), ("reuse_ms", "0")]),
    )
    .unwrap();
    assert!(host.authenticate(&alice).unwrap().is_ok());
    assert_eq!(reused(&host, &alice), None);
    let bad = host.replace(
        Slot::Auth,
        &auth_wasm(),
        owned(&[("api_keys", &keys_config()), ("reuse_ms", "soon")]),
    );
    assert!(
        matches!(bad, Err(PluginError::SelfTest(ref m)) if m.contains("reuse_ms")),
        "{bad:?}"
    );
}

/// A config change (what the key-file watch applies) reaches the serving component and the one
/// kept for rollback, drops what was reused, and a config the plugin refuses changes nothing.
#[test]
fn a_new_config_reaches_the_serving_and_the_kept_component() {
    let host = auth_host(&[("api_keys", &keys_config())]);
    // A second install, so a component is kept for rollback (with alice in its config).
    host.replace(
        Slot::Auth,
        &auth_wasm(),
        owned(&[("api_keys", &keys_config())]),
    )
    .unwrap();
    let alice = request(&[("authorization", &bearer(ALICE))]);
    let bob = request(&[("authorization", &bearer(BOB))]);
    assert!(host.authenticate(&alice).unwrap().is_ok());
    assert_eq!(reused(&host, &alice).as_deref(), Some("key:alice"));
    let sha256 = host.installed(Slot::Auth).unwrap().sha256;

    let without_alice = owned(&[("api_keys", &format!("bob={}", hash_key(BOB)))]);
    assert!(host.reconfigure(Slot::Auth, without_alice.clone()).unwrap());
    assert_eq!(
        reused(&host, &alice),
        None,
        "reuse ends with the old config"
    );
    assert!(host.authenticate(&alice).unwrap().is_err());
    assert!(host.authenticate(&bob).unwrap().is_ok());
    assert_eq!(
        host.installed(Slot::Auth).unwrap().sha256,
        sha256,
        "same component"
    );
    assert_eq!(host.config(Slot::Auth), Some(without_alice.clone()));
    // The same config again is no change.
    assert!(!host.reconfigure(Slot::Auth, without_alice.clone()).unwrap());

    // Rolling back brings the previous component, not the removed key.
    host.rollback(Slot::Auth).unwrap();
    assert!(host.authenticate(&alice).unwrap().is_err());
    assert!(host.authenticate(&bob).unwrap().is_ok());

    // An upload of a component takes the config the slot serves with.
    host.replace_component(Slot::Auth, &auth_wasm()).unwrap();
    assert!(host.authenticate(&alice).unwrap().is_err());
    assert!(host.authenticate(&bob).unwrap().is_ok());

    // A config its self-test refuses leaves the old one serving.
    let bad = host.reconfigure(
        Slot::Auth,
        owned(&[("api_keys", &keys_config()), ("reuse_ms", "soon")]),
    );
    assert!(
        matches!(bad, Err(PluginError::SelfTest(ref m)) if m.contains("reuse_ms")),
        "{bad:?}"
    );
    assert!(host.authenticate(&alice).unwrap().is_err());
    assert_eq!(host.config(Slot::Auth), Some(without_alice));
}

/// A JWT's acceptance is never reused past the token's `exp`.
#[test]
fn a_jwt_acceptance_is_not_reused_past_its_expiry() {
    let host = auth_host(&[("jwt_algorithm", "HS256"), ("jwt_key", HMAC_SECRET)]);
    let token = hs256(&claims("user-7", 1, serde_json::json!({})), HMAC_SECRET);
    let with_token = request(&[("authorization", &bearer(&token))]);
    assert!(host.authenticate(&with_token).unwrap().is_ok());
    let long = hs256(&claims("user-8", 600, serde_json::json!({})), HMAC_SECRET);
    let with_long = request(&[("authorization", &bearer(&long))]);
    assert!(host.authenticate(&with_long).unwrap().is_ok());
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(reused(&host, &with_token), None, "expired");
    assert_eq!(reused(&host, &with_long).as_deref(), Some("jwt:user-8"));
}

fn jwt_denial(host: &PluginHost, token: &str) -> String {
    match authenticate(host, &[("authorization", &bearer(token))]) {
        Ok(p) => panic!("accepted {p:?}"),
        Err(denial) => {
            assert!(!denial.reason.contains(token));
            denial.reason
        }
    }
}

#[test]
fn hs256_jwts_are_verified_by_the_host() {
    let host = auth_host(&[
        ("jwt_algorithm", "HS256"),
        ("jwt_key", HMAC_SECRET),
        ("jwt_issuer", "https://issuer.example"),
        ("jwt_audience", "wanserve"),
    ]);
    let good =
        serde_json::json!({"iss": "https://issuer.example", "aud": "wanserve", "tier": "premium"});
    let token = hs256(&claims("user-7", 600, good.clone()), HMAC_SECRET);
    let who = authenticate(&host, &[("authorization", &bearer(&token))]).unwrap();
    assert_eq!(who.id, "jwt:user-7");
    assert!(who.attributes.contains(&("tier".into(), "premium".into())));

    let expired = hs256(&claims("user-7", -5, good.clone()), HMAC_SECRET);
    assert!(jwt_denial(&host, &expired).contains("expired"));
    let mut early = claims("user-7", 600, good.clone());
    early["nbf"] = serde_json::json!(now() + 300);
    assert!(jwt_denial(&host, &hs256(&early, HMAC_SECRET)).contains("not valid yet"));
    let mut no_exp = claims("user-7", 600, good.clone());
    no_exp.as_object_mut().unwrap().remove("exp");
    assert!(jwt_denial(&host, &hs256(&no_exp, HMAC_SECRET)).contains("required claim"));
    let wrong_iss = claims(
        "user-7",
        600,
        serde_json::json!({"iss": "https://evil.example", "aud": "wanserve"}),
    );
    assert!(jwt_denial(&host, &hs256(&wrong_iss, HMAC_SECRET)).contains("issuer"));
    let wrong_aud = claims(
        "user-7",
        600,
        serde_json::json!({"iss": "https://issuer.example", "aud": "other"}),
    );
    assert!(jwt_denial(&host, &hs256(&wrong_aud, HMAC_SECRET)).contains("audience"));

    // Forged: signed with another secret, or a valid token whose claims were swapped.
    let other_secret = hs256(
        &claims("user-7", 600, good.clone()),
        "another-secret-that-is-also-32-bytes-long",
    );
    assert!(jwt_denial(&host, &other_secret).contains("signature"));
    let admin = hs256(&claims("admin", 600, good.clone()), "x".repeat(40).as_str());
    let (_, admin_payload, _) = split3(&admin);
    let (header, _, signature) = split3(&token);
    let spliced = format!("{header}.{admin_payload}.{signature}");
    assert!(jwt_denial(&host, &spliced).contains("signature"));

    // alg none: no signature at all.
    let none = unsigned(&claims("admin", 600, good.clone()));
    // Refused by the JWT verifier for its algorithm (the API-key path would say "API key").
    assert!(jwt_denial(&host, &none).contains("algorithm"));
    let none_with_sig = format!("{none}{}", signature);
    assert!(jwt_denial(&host, &none_with_sig).contains("algorithm"));
    let none_upper = format!(
        "{}.{}.",
        b64(r#"{"alg":"NONE","typ":"JWT"}"#),
        b64(&claims("admin", 600, good.clone()).to_string())
    );
    assert!(jwt_denial(&host, &none_upper).contains("algorithm"));

    // HS384 with the right secret is still not the pinned algorithm.
    let hs384 = encode(
        &Header::new(Algorithm::HS384),
        &claims("user-7", 600, good),
        &EncodingKey::from_secret(HMAC_SECRET.as_bytes()),
    )
    .unwrap();
    assert!(jwt_denial(&host, &hs384).contains("algorithm"));
}

fn split3(token: &str) -> (&str, &str, &str) {
    let mut parts = token.splitn(3, '.');
    (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    )
}

#[test]
fn rs256_jwts_refuse_hmac_confusion_with_the_public_key() {
    let public = fixture("rsa-public.pem");
    let host = auth_host(&[("jwt_algorithm", "RS256"), ("jwt_key", &public)]);
    let token = rs256(
        &claims("svc", 600, serde_json::json!({})),
        &fixture("rsa-private.pem"),
    );
    assert_eq!(
        authenticate(&host, &[("authorization", &bearer(&token))])
            .unwrap()
            .id,
        "jwt:svc"
    );

    // The classic confusion: HS256 "signed" with the server's public key as the HMAC secret.
    let confused = hs256(&claims("admin", 600, serde_json::json!({})), &public);
    assert!(jwt_denial(&host, &confused).contains("algorithm"));
    // Signed by a key the server does not trust.
    let stranger = rs256(
        &claims("admin", 600, serde_json::json!({})),
        &fixture("other-rsa-private.pem"),
    );
    assert!(jwt_denial(&host, &stranger).contains("signature"));
    let expired = rs256(
        &claims("svc", -5, serde_json::json!({})),
        &fixture("rsa-private.pem"),
    );
    assert!(jwt_denial(&host, &expired).contains("expired"));
}

#[test]
fn jwt_config_is_checked_at_install_and_jwts_are_refused_when_not_configured() {
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    for (config, why) in [
        (vec![("jwt_algorithm", "HS256")], "jwt_key is missing"),
        (
            vec![("jwt_algorithm", "HS256"), ("jwt_key", "short")],
            "at least 32 bytes",
        ),
        (
            vec![("jwt_algorithm", "RS256"), ("jwt_key", "not a pem")],
            "not a usable key",
        ),
        (
            vec![("jwt_algorithm", "none"), ("jwt_key", HMAC_SECRET)],
            "unknown algorithm",
        ),
    ] {
        let err = host
            .replace(Slot::Auth, &auth_wasm(), owned(&config))
            .unwrap_err();
        assert!(
            matches!(err, PluginError::Config { .. }) && err.to_string().contains(why),
            "{err}"
        );
        assert!(!err.to_string().contains(HMAC_SECRET));
    }
    // Keys only: a JWT-shaped token is just a wrong key.
    let host = auth_host(&[("api_keys", &keys_config())]);
    let token = hs256(&claims("user", 600, serde_json::json!({})), HMAC_SECRET);
    assert!(authenticate(&host, &[("authorization", &bearer(&token))]).is_err());
}

#[test]
fn key_list_is_seeded_from_the_environment_or_generated_once() {
    let data = tempfile::tempdir().unwrap();
    // From WANSERVE_API_KEYS: hashed, nothing written, nothing generated.
    let mut config = BTreeMap::new();
    let generated = seed_api_keys(
        &mut config,
        Some(&format!("{ALICE}, {BOB}")),
        data.path(),
        true,
    )
    .unwrap();
    assert!(generated.is_none());
    assert!(!data.path().join("api-keys").exists());
    assert!(!config["api_keys"].contains(ALICE));
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    host.replace(Slot::Auth, &auth_wasm(), config.clone())
        .unwrap();
    let bob = authenticate(&host, &[("authorization", &bearer(BOB))])
        .unwrap()
        .id;
    assert!(bob.starts_with("key:key-") && !bob.contains(BOB), "{bob}");
    // A key's principal does not depend on its place in the list: with Alice's key removed,
    // or the list reordered, Bob is still Bob (and never becomes Alice).
    for list in [BOB.to_string(), format!("{BOB},{ALICE}")] {
        let mut config = BTreeMap::new();
        seed_api_keys(&mut config, Some(&list), data.path(), true).unwrap();
        let host = PluginHost::new(PluginLimits::default()).unwrap();
        host.replace(Slot::Auth, &auth_wasm(), config).unwrap();
        assert_eq!(
            authenticate(&host, &[("authorization", &bearer(BOB))])
                .unwrap()
                .id,
            bob,
            "{list}"
        );
    }
    // Named explicitly (`name=key`; the old position names can be kept this way), and a bare
    // key with base64 padding is still one key.
    let padded = "c2VjcmV0LWtleS1mb3ItdGVzdHM=";
    let mut config = BTreeMap::new();
    seed_api_keys(
        &mut config,
        Some(&format!("env-1={ALICE},ci.runner={BOB},{padded}")),
        data.path(),
        true,
    )
    .unwrap();
    let host = PluginHost::new(PluginLimits::default()).unwrap();
    host.replace(Slot::Auth, &auth_wasm(), config).unwrap();
    let id = |key: &str| {
        authenticate(&host, &[("authorization", &bearer(key))])
            .unwrap()
            .id
    };
    assert_eq!(id(ALICE), "key:env-1");
    assert_eq!(id(BOB), "key:ci.runner");
    assert!(id(padded).starts_with("key:key-"), "{}", id(padded));
    let mut config = BTreeMap::new();
    let err = seed_api_keys(&mut config, Some("good,bad\tkey"), data.path(), true).unwrap_err();
    assert!(err.to_string().contains("entry 2"), "{err}");
    assert!(
        !err.to_string().contains("bad"),
        "the key stays out of errors: {err}"
    );

    // Nothing configured: a key is generated, only its hash is stored (owner-only), and the
    // next start finds it instead of generating another.
    let mut config = BTreeMap::new();
    let key = seed_api_keys(&mut config, None, data.path(), true)
        .unwrap()
        .expect("a generated key");
    assert!(key.starts_with("wsk_") && key.len() == 4 + 64);
    let stored = std::fs::read_to_string(data.path().join("api-keys")).unwrap();
    assert!(!stored.contains(&key) && stored.contains(&hash_key(&key)));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.path().join("api-keys"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key file is private: {mode:o}");
    }
    host.replace(Slot::Auth, &auth_wasm(), config).unwrap();
    assert!(authenticate(&host, &[("authorization", &bearer(&key))]).is_ok());
    let mut again = BTreeMap::new();
    assert!(
        seed_api_keys(&mut again, None, data.path(), true)
            .unwrap()
            .is_none()
    );
    host.replace(Slot::Auth, &auth_wasm(), again).unwrap();
    assert!(authenticate(&host, &[("authorization", &bearer(&key))]).is_ok());

    // JWT-only deployments need no generated key.
    let fresh = tempfile::tempdir().unwrap();
    let mut jwt_only = owned(&[("jwt_algorithm", "HS256"), ("jwt_key", HMAC_SECRET)]);
    assert!(
        seed_api_keys(&mut jwt_only, None, fresh.path(), true)
            .unwrap()
            .is_none()
    );
    assert!(!fresh.path().join("api-keys").exists());
    // A key with whitespace in the environment is an error naming the variable, not the key.
    let err = seed_api_keys(
        &mut BTreeMap::new(),
        Some("good,has space"),
        fresh.path(),
        true,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("WANSERVE_API_KEYS") && !err.to_string().contains("has space")
    );
}

/// A tracing writer that keeps everything written, for the no-secrets-in-logs test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn keys_and_tokens_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let data = tempfile::tempdir().unwrap();
    let token = hs256(&claims("user", 600, serde_json::json!({})), HMAC_SECRET);
    let mut generated = None;
    tracing::subscriber::with_default(subscriber, || {
        // Other tests' threads may have hit these callsites while no subscriber wanted them,
        // and tracing caches that: recompute with this one in place (a CI run lost the
        // "generated one" line to that race).
        tracing::callsite::rebuild_interest_cache();
        let mut config = owned(&[("public_paths", "/health")]);
        generated = seed_api_keys(&mut config, None, data.path(), true).unwrap();
        seed_api_keys(&mut config, Some(ALICE), data.path(), true).unwrap();
        config.insert("jwt_algorithm".into(), "HS256".into());
        config.insert("jwt_key".into(), HMAC_SECRET.into());
        let host = PluginHost::new(PluginLimits::default()).unwrap();
        host.replace(Slot::Auth, &auth_wasm(), config).unwrap();
        // Each call's answer is what it should be, and a refusal's reason is logged as the
        // server logs it (`request refused: not authenticated`): a reason quoting the
        // credential would leak it there.
        let accepted: Vec<bool> = [
            bearer(ALICE),
            bearer("wrong"),
            bearer(&token),
            format!("Basic {ALICE}"),
        ]
        .iter()
        .map(|header| {
            match host
                .authenticate(&request(&[("authorization", header)]))
                .expect("the call runs")
            {
                Ok(_) => true,
                Err(denial) => {
                    tracing::info!(reason = %denial.reason, "request refused: not authenticated");
                    false
                }
            }
        })
        .collect();
        assert_eq!(accepted, [true, false, true, false]);
        // Configs an operator got wrong with a secret in them (a plain key where its hash
        // belongs, an HMAC secret given to RS256): refused, and the reason (which the plugin
        // watcher logs and the admin API returns) names the entry, not the secret in it.
        for bad in [
            owned(&[("api_keys", &format!("alice={ALICE}"))]),
            owned(&[("api_keys", ALICE)]),
            owned(&[("jwt_algorithm", "RS256"), ("jwt_key", HMAC_SECRET)]),
        ] {
            let reason = host
                .replace(Slot::Auth, &auth_wasm(), bad)
                .expect_err("a bad config is refused")
                .to_string();
            tracing::warn!(%reason, "changed plugin refused; the old plugin keeps serving");
        }
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("generated one"), "the capture works: {logs}");
    assert_eq!(
        logs.matches("request refused: not authenticated").count(),
        2,
        "both refusals were logged: {logs}"
    );
    assert!(
        logs.contains("entry 1 (alice)") && logs.contains("jwt_key"),
        "the refusals were logged: {logs}"
    );
    let generated = generated.unwrap();
    for secret in [ALICE, generated.as_str(), token.as_str(), HMAC_SECRET] {
        assert!(
            !logs.contains(secret),
            "{secret} leaked into the logs:\n{logs}"
        );
    }
}

//! Acceptances an auth plugin lets the host reuse (`host.reuse-principal`): the plugin names
//! what its answer depends on (method and path always, plus the headers and peer it lists) and
//! for how long; a later request that agrees on all of that gets the same principal without a
//! plugin call. Each installed component has its own table, so a swap or a rollback starts
//! empty, and refusals are never stored (every bad credential still reaches the plugin).
//!
//! Entries are keyed by a SHA-256 over a per-process secret and the request's parts, so the
//! table holds no credential, and a lookup's timing says nothing an attacker can steer towards
//! a stored key.

use super::{HttpRequest, Principal};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// The longest a plugin may have an acceptance reused.
pub const MAX_REUSE: Duration = Duration::from_secs(60);
/// Entries per installed component; past it, expired ones are dropped and, if that is not
/// enough, nothing new is stored until some expire.
const MAX_ENTRIES: usize = 4096;
/// Distinct rules (header sets) per installed component; a lookup tries each.
const MAX_RULES: usize = 4;
/// Headers one rule may name.
const MAX_VARY_HEADERS: usize = 16;

/// What an acceptance depends on besides the method and path, as the plugin declared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReuseRule {
    /// Lower-case, sorted, without duplicates.
    headers: Vec<String>,
    peer: bool,
    ttl: Duration,
}

impl ReuseRule {
    /// The plugin's declaration, normalised; `None` when it asks for nothing usable.
    pub fn new(headers: Vec<String>, peer: bool, ttl_ms: u32) -> Option<Self> {
        let ttl = Duration::from_millis(ttl_ms.into()).min(MAX_REUSE);
        if ttl.is_zero() || headers.len() > MAX_VARY_HEADERS {
            return None;
        }
        let mut headers: Vec<String> = headers
            .into_iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect();
        headers.sort();
        headers.dedup();
        Some(Self { headers, peer, ttl })
    }
}

/// The parts of a request a rule can depend on, borrowed from wherever the request is.
pub struct RequestParts<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub peer: &'a str,
    /// In arrival order, names lower-case, values as the plugin sees them.
    pub headers: Vec<(&'a str, Cow<'a, str>)>,
}

impl<'a> RequestParts<'a> {
    pub fn of(request: &'a HttpRequest) -> Self {
        Self {
            method: &request.method,
            path: &request.path,
            peer: &request.peer,
            headers: request
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), Cow::Borrowed(v.as_str())))
                .collect(),
        }
    }

    /// What the plugin is given for this request (header values decoded the same way).
    pub fn to_request(&self) -> HttpRequest {
        HttpRequest {
            method: self.method.to_string(),
            path: self.path.to_string(),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            peer: self.peer.to_string(),
        }
    }
}

struct Entry {
    principal: Principal,
    expires: Instant,
}

/// One installed auth component's reusable acceptances.
pub struct PrincipalCache {
    secret: [u8; 32],
    rules: RwLock<Vec<Arc<ReuseRule>>>,
    entries: RwLock<HashMap<[u8; 32], Entry>>,
}

impl PrincipalCache {
    pub fn new() -> Self {
        let mut secret = [0u8; 32];
        // Without the OS generator the keys are still digests of the request; only their
        // unpredictability is lost.
        let _ = getrandom::fill(&mut secret);
        Self {
            secret,
            rules: RwLock::new(Vec::new()),
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn key(&self, rule: &ReuseRule, request: &RequestParts<'_>) -> [u8; 32] {
        // Every field length-prefixed, so no two different requests feed the same bytes.
        fn field(hash: &mut Sha256, bytes: &[u8]) {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        }
        let mut hash = Sha256::new();
        hash.update(self.secret);
        field(&mut hash, request.method.as_bytes());
        field(&mut hash, request.path.as_bytes());
        field(&mut hash, &[u8::from(rule.peer)]);
        if rule.peer {
            field(&mut hash, request.peer.as_bytes());
        }
        for name in &rule.headers {
            field(&mut hash, name.as_bytes());
            for (_, value) in request.headers.iter().filter(|(n, _)| *n == name.as_str()) {
                field(&mut hash, value.as_bytes());
            }
            // Ends the header's values: "a" then "b" differs from "ab".
            hash.update([0xff]);
        }
        hash.finalize().into()
    }

    /// The principal an earlier acceptance lets this request have, if any is still valid.
    pub fn lookup(&self, request: &RequestParts<'_>) -> Option<Principal> {
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if rules.is_empty() {
            return None;
        }
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        rules.iter().find_map(|rule| {
            entries
                .get(&self.key(rule, request))
                .filter(|e| e.expires > now)
                .map(|e| e.principal.clone())
        })
    }

    /// Stores an acceptance the plugin declared reusable under `rule`.
    pub fn remember(&self, rule: ReuseRule, request: &RequestParts<'_>, principal: &Principal) {
        let rule = {
            let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
            match rules
                .iter()
                .find(|r| r.headers == rule.headers && r.peer == rule.peer)
            {
                Some(known) => Arc::new(ReuseRule {
                    ttl: rule.ttl,
                    ..(**known).clone()
                }),
                None if rules.len() < MAX_RULES => {
                    let rule = Arc::new(rule);
                    rules.push(rule.clone());
                    rule
                }
                None => return,
            }
        };
        let key = self.key(&rule, request);
        let now = Instant::now();
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= MAX_ENTRIES {
                return;
            }
        }
        entries.insert(
            key,
            Entry {
                principal: principal.clone(),
                expires: now + rule.ttl,
            },
        );
    }

    /// Forgets everything (the component is serving again after a rollback).
    pub fn clear(&self) {
        self.entries
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(auth: &'a str, path: &'a str, peer: &'a str) -> RequestParts<'a> {
        RequestParts {
            method: "POST",
            path,
            peer,
            headers: vec![
                ("host", Cow::Borrowed("localhost")),
                ("authorization", Cow::Borrowed(auth)),
            ],
        }
    }

    fn principal(id: &str) -> Principal {
        Principal {
            id: id.into(),
            display_name: id.into(),
            attributes: vec![],
        }
    }

    #[test]
    fn an_acceptance_is_reused_only_for_the_same_method_path_and_named_headers() {
        let cache = PrincipalCache::new();
        let rule = ReuseRule::new(vec!["Authorization".into()], false, 10_000).expect("rule");
        cache.remember(
            rule,
            &request("Bearer a", "/video/status", "1.2.3.4:5"),
            &principal("key:a"),
        );
        let hit = cache.lookup(&request("Bearer a", "/video/status", "9.9.9.9:9"));
        assert_eq!(hit.map(|p| p.id).as_deref(), Some("key:a"));
        assert!(
            cache
                .lookup(&request("Bearer b", "/video/status", "1.2.3.4:5"))
                .is_none()
        );
        assert!(
            cache
                .lookup(&request("Bearer a", "/video/submit", "1.2.3.4:5"))
                .is_none()
        );
        let mut other_method = request("Bearer a", "/video/status", "1.2.3.4:5");
        other_method.method = "DELETE";
        assert!(cache.lookup(&other_method).is_none());
        // A second Authorization header is a different request.
        let mut doubled = request("Bearer a", "/video/status", "1.2.3.4:5");
        doubled
            .headers
            .push(("authorization", Cow::Borrowed("Bearer a")));
        assert!(cache.lookup(&doubled).is_none());
        cache.clear();
        assert!(
            cache
                .lookup(&request("Bearer a", "/video/status", "1.2.3.4:5"))
                .is_none()
        );
    }

    #[test]
    fn a_rule_on_the_peer_separates_peers_and_an_entry_expires() {
        let cache = PrincipalCache::new();
        let rule = ReuseRule::new(vec![], true, 30).expect("rule");
        cache.remember(
            rule,
            &request("", "/video/status", "1.2.3.4:5"),
            &principal("anonymous"),
        );
        assert!(
            cache
                .lookup(&request("", "/video/status", "1.2.3.4:5"))
                .is_some()
        );
        assert!(
            cache
                .lookup(&request("", "/video/status", "1.2.3.4:6"))
                .is_none()
        );
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            cache
                .lookup(&request("", "/video/status", "1.2.3.4:5"))
                .is_none()
        );
    }

    #[test]
    fn a_zero_or_overlong_declaration_is_not_a_rule_and_the_ttl_is_capped() {
        assert!(ReuseRule::new(vec![], false, 0).is_none());
        assert!(ReuseRule::new(vec!["x".into(); MAX_VARY_HEADERS + 1], false, 1).is_none());
        let rule = ReuseRule::new(vec!["B".into(), "a".into(), "b".into()], false, u32::MAX)
            .expect("rule");
        assert_eq!(rule.ttl, MAX_REUSE);
        assert_eq!(rule.headers, ["a", "b"]);
    }
}

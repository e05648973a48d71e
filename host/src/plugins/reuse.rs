//! Acceptances an auth plugin lets the host reuse (`host.reuse-principal`): the plugin names
//! what its answer depends on (method and path always, plus the headers and peer it lists) and
//! for how long; a later request that agrees on all of that gets the same principal without a
//! plugin call. Each installed component has its own table, so a swap or a rollback starts
//! empty, and refusals are never stored (every bad credential still reaches the plugin).
//!
//! Entries are keyed by a SHA-256 over the table's own random secret and the request's parts,
//! so the table holds no credential, and a lookup's timing says nothing an attacker can steer
//! towards a stored key.

use super::bindings::{HttpRequest, Principal};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::RwLock;
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

/// What an acceptance depends on besides the method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vary {
    /// Lower-case, sorted, without duplicates.
    headers: Vec<String>,
    peer: bool,
}

/// An acceptance's reuse, as the plugin declared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReuseRule {
    vary: Vary,
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
        Some(Self {
            vary: Vary { headers, peer },
            ttl,
        })
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

    /// What the plugin is given for this request (header values decoded the same way, moved
    /// rather than copied where decoding already made them owned).
    pub fn into_request(self) -> HttpRequest {
        HttpRequest {
            method: self.method.to_string(),
            path: self.path.to_string(),
            headers: self
                .headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.into_owned()))
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
    /// The distinct `Vary`s declared so far; a lookup tries each.
    rules: RwLock<Vec<Vary>>,
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

    fn key(&self, vary: &Vary, request: &RequestParts<'_>) -> [u8; 32] {
        // Every field length-prefixed, so no two different requests feed the same bytes.
        fn field(hash: &mut Sha256, bytes: &[u8]) {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        }
        let mut hash = Sha256::new();
        hash.update(self.secret);
        field(&mut hash, request.method.as_bytes());
        field(&mut hash, request.path.as_bytes());
        field(&mut hash, &[u8::from(vary.peer)]);
        if vary.peer {
            field(&mut hash, request.peer.as_bytes());
        }
        for name in &vary.headers {
            field(&mut hash, name.as_bytes());
            for (_, value) in request.headers.iter().filter(|(n, _)| *n == name.as_str()) {
                field(&mut hash, value.as_bytes());
            }
            // Ends this header's values, so a value cannot pass for the next header's name.
            hash.update([0xff]);
        }
        hash.finalize().into()
    }

    /// The principal an earlier acceptance lets this request have, if any is still valid.
    pub fn lookup(&self, request: &RequestParts<'_>) -> Option<Principal> {
        self.lookup_at(request, Instant::now())
    }

    /// [`PrincipalCache::lookup`] as of `now` (tests ask about a later moment instead of
    /// sleeping until it).
    fn lookup_at(&self, request: &RequestParts<'_>, now: Instant) -> Option<Principal> {
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if rules.is_empty() {
            return None;
        }
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        rules.iter().find_map(|vary| {
            entries
                .get(&self.key(vary, request))
                .filter(|e| e.expires > now)
                .map(|e| e.principal.clone())
        })
    }

    /// Stores an acceptance the plugin declared reusable under `rule`.
    pub fn remember(&self, rule: ReuseRule, request: &RequestParts<'_>, principal: &Principal) {
        {
            let mut rules = self.rules.write().unwrap_or_else(|p| p.into_inner());
            if !rules.contains(&rule.vary) {
                if rules.len() >= MAX_RULES {
                    return;
                }
                rules.push(rule.vary.clone());
            }
        }
        let key = self.key(&rule.vary, request);
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

    fn reused(cache: &PrincipalCache, request: &RequestParts<'_>) -> Option<String> {
        cache.lookup(request).map(|p| p.id)
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
        let hit = reused(&cache, &request("Bearer a", "/video/status", "9.9.9.9:9"));
        assert_eq!(hit.as_deref(), Some("key:a"));
        let other_key = request("Bearer b", "/video/status", "1.2.3.4:5");
        assert_eq!(reused(&cache, &other_key), None);
        let other_path = request("Bearer a", "/video/submit", "1.2.3.4:5");
        assert_eq!(reused(&cache, &other_path), None);
        let mut other_method = request("Bearer a", "/video/status", "1.2.3.4:5");
        other_method.method = "DELETE";
        assert_eq!(reused(&cache, &other_method), None);
        // A second Authorization header is a different request.
        let mut doubled = request("Bearer a", "/video/status", "1.2.3.4:5");
        doubled
            .headers
            .push(("authorization", Cow::Borrowed("Bearer a")));
        assert_eq!(reused(&cache, &doubled), None);
        cache.clear();
        let same = request("Bearer a", "/video/status", "1.2.3.4:5");
        assert_eq!(reused(&cache, &same), None);
    }

    #[test]
    fn a_rule_on_the_peer_separates_peers_and_an_entry_expires() {
        let cache = PrincipalCache::new();
        // 10 s: ample on a loaded machine; the expiry is checked as of a later moment.
        let rule = ReuseRule::new(vec![], true, 10_000).expect("rule");
        cache.remember(
            rule,
            &request("", "/video/status", "1.2.3.4:5"),
            &principal("anonymous"),
        );
        let same_peer = request("", "/video/status", "1.2.3.4:5");
        assert_eq!(reused(&cache, &same_peer).as_deref(), Some("anonymous"));
        let other_peer = request("", "/video/status", "1.2.3.4:6");
        assert_eq!(reused(&cache, &other_peer), None);
        let later = Instant::now() + Duration::from_millis(10_001);
        assert!(
            cache.lookup_at(&same_peer, later).is_none(),
            "expired after its 10 s"
        );
        let before = Instant::now() + Duration::from_millis(9_000);
        assert!(
            cache.lookup_at(&same_peer, before).is_some(),
            "still valid before"
        );
    }

    #[test]
    fn a_zero_or_overlong_declaration_is_not_a_rule_and_the_ttl_is_capped() {
        assert!(ReuseRule::new(vec![], false, 0).is_none());
        assert!(ReuseRule::new(vec!["x".into(); MAX_VARY_HEADERS + 1], false, 1).is_none());
        let rule = ReuseRule::new(vec!["B".into(), "a".into(), "b".into()], false, u32::MAX)
            .expect("rule");
        assert_eq!(rule.ttl, MAX_REUSE);
        assert_eq!(rule.vary.headers, ["a", "b"]);
    }
}

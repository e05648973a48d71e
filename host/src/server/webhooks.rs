//! Webhooks: a job submitted with `"webhook": "https://…"` has its final status POSTed there
//! once it ends, signed the Standard Webhooks way (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`).
//!
//! Delivery is at least once with a stable id: the delivery row is created by the same update
//! that makes the job final (a trigger in the schema), a sender leases it while it tries, and a
//! failure (no answer, not 2xx) is retried with exponential backoff until `give_up_after` has
//! passed since the job ended.
//!
//! The server must not become a way into the network it sits in: a webhook may not point at
//! loopback, private, link-local or other non-public addresses unless the operator allowed that
//! network (`--webhook-allow`). Checked at submit (422) and again when sending, by the resolver
//! the HTTP client connects through (a name that resolves elsewhere later is still refused);
//! redirects are not followed.

use crate::ids::now_ms;
use crate::jobs::{WebhookAttempt, WebhookDelivery};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretSlice, SecretString};
use sha2::Sha256;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// The signing secret's file in the data directory (`whsec_…`, as receivers configure it).
pub const WEBHOOK_SECRET_FILE: &str = "webhook-secret";
const SECRET_PREFIX: &str = "whsec_";
const MAX_URL_LEN: usize = 2048;
/// One attempt: connect, send, and read the status line.
pub(super) const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries never wait longer than this between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Deliveries sent at once by one server.
pub(super) const CONCURRENT: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook secret: {0}")]
    Secret(String),
    #[error("webhook client: {0}")]
    Client(String),
}

/// Networks that are not the public internet (RFC 6890 and friends).
const INTERNAL_NETWORKS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "100::/64",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Which addresses webhooks may reach: every public one, plus the networks the operator allowed.
#[derive(Debug, Clone, Default)]
pub struct WebhookPolicy {
    pub allowed: Vec<IpNet>,
}

impl WebhookPolicy {
    pub fn allows(&self, ip: IpAddr) -> bool {
        // ::ffff:10.0.0.1 is 10.0.0.1.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let internal = INTERNAL_NETWORKS
            .iter()
            .filter_map(|n| n.parse::<IpNet>().ok())
            .any(|net| net.contains(&ip));
        !internal || self.allowed.iter().any(|net| net.contains(&ip))
    }

    /// The target's addresses (all must be allowed), or why it is refused, in words for a 422.
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((host, port)),
            )
            .await
            .map_err(|_| format!("{host} did not resolve in time"))?
            .map_err(|_| format!("{host} does not resolve"))?
            .collect(),
        };
        if addrs.is_empty() {
            return Err(format!("{host} does not resolve"));
        }
        if addrs.iter().any(|a| !self.allows(a.ip())) {
            return Err(format!(
                "{host} is a loopback, private or otherwise internal address, which this server \
                 does not call (the operator can allow networks with --webhook-allow)"
            ));
        }
        Ok(addrs)
    }

    /// Checks a submitted webhook URL: an http(s) URL whose host resolves only to allowed
    /// addresses. The reason is for the client (422).
    pub async fn check(&self, url: &str) -> Result<Url, String> {
        if url.len() > MAX_URL_LEN {
            return Err(format!("must be at most {MAX_URL_LEN} characters"));
        }
        let parsed = Url::parse(url).map_err(|e| format!("is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err("must be an http or https URL".into());
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(name)) => name.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("must name a host".into()),
        };
        let port = parsed.port_or_known_default().unwrap_or(80);
        self.resolve(&host, port).await?;
        Ok(parsed)
    }
}

/// Resolves names for the webhook client through the policy, so the address connected to is
/// one that was checked (not whatever the name says a moment after the check).
struct PolicyResolver(Arc<WebhookPolicy>);

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = policy.resolve(&host, 0).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// 32 random bytes for a new secret.
pub fn fresh_secret() -> Result<Vec<u8>, WebhookError> {
    let mut bytes = vec![0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| WebhookError::Secret(format!("no randomness: {e}")))?;
    Ok(bytes)
}

/// The webhook secret: the configured one; else the fleet's (`shared`, from the shared queue),
/// also written to the data directory for the operator to hand to receivers; else the one in
/// the data directory (created once).
pub fn load_secret(
    configured: Option<&SecretString>,
    shared: Option<Vec<u8>>,
    data_dir: &Path,
) -> Result<SecretSlice<u8>, WebhookError> {
    let decode = |text: &str, whence: &str| {
        text.trim()
            .strip_prefix(SECRET_PREFIX)
            .and_then(|b64| STANDARD.decode(b64).ok())
            .filter(|bytes| bytes.len() >= 24)
            .map(SecretSlice::from)
            .ok_or_else(|| {
                WebhookError::Secret(format!(
                    "{whence} is not whsec_ followed by base64 of at least 24 bytes"
                ))
            })
    };
    if let Some(secret) = configured {
        return decode(secret.expose_secret(), "WANSERVE_WEBHOOK_SECRET");
    }
    let path = data_dir.join(WEBHOOK_SECRET_FILE);
    if let Some(bytes) = shared {
        let text = format!("{SECRET_PREFIX}{}\n", STANDARD.encode(&bytes));
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            crate::private_file::write_private_file(&path, text.as_bytes())
                .map_err(|e| WebhookError::Secret(format!("{}: {e}", path.display())))?;
        }
        return Ok(bytes.into());
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => return decode(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(WebhookError::Secret(format!("{}: {e}", path.display()))),
    }
    let bytes = fresh_secret()?;
    let text = format!("{SECRET_PREFIX}{}\n", STANDARD.encode(&bytes));
    crate::private_file::write_private_file(&path, text.as_bytes())
        .map_err(|e| WebhookError::Secret(format!("{}: {e}", path.display())))?;
    tracing::info!(path = %path.display(), "generated the webhook signing secret (give it to receivers)");
    Ok(bytes.into())
}

/// `v1,<base64>`: HMAC-SHA256 over `id.timestamp.body` (Standard Webhooks).
pub fn signature(secret: &SecretSlice<u8>, id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose_secret())
        .expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

pub struct WebhookSettings {
    pub policy: WebhookPolicy,
    /// Wait before the first retry; doubled for each one after.
    pub first_retry: Duration,
    /// No attempt starts this long after the job ended.
    pub give_up_after: Duration,
    /// The operator's egress proxy (`--webhook-proxy`); `None`: direct connections, never a
    /// proxy from the environment (its name, not the target's, would pass the address checks,
    /// and a dead one would stop every delivery).
    pub proxy: Option<SecretString>,
}

pub struct Webhooks {
    http: reqwest::Client,
    /// Through a proxy the resolver sees the proxy's name: each attempt checks the target first.
    proxied: bool,
    pub policy: Arc<WebhookPolicy>,
    secret: SecretSlice<u8>,
    first_retry: Duration,
    give_up_after: Duration,
}

impl Webhooks {
    pub fn new(settings: WebhookSettings, secret: SecretSlice<u8>) -> Result<Self, WebhookError> {
        let policy = Arc::new(settings.policy);
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ATTEMPT_TIMEOUT)
            .user_agent(concat!("wanserve-webhooks/", env!("CARGO_PKG_VERSION")));
        let proxied = settings.proxy.is_some();
        let builder = match &settings.proxy {
            // The proxy is the operator's: its own address is not a webhook target.
            Some(proxy) => builder.proxy(reqwest::Proxy::all(proxy.expose_secret()).map_err(
                // Not the URL itself: it may carry the proxy's password.
                |_| WebhookError::Client("--webhook-proxy is not a proxy URL".into()),
            )?),
            None => builder
                .no_proxy()
                .dns_resolver(Arc::new(PolicyResolver(policy.clone()))),
        };
        let http = builder
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(Self {
            http,
            proxied,
            policy,
            secret,
            first_retry: settings.first_retry,
            give_up_after: settings.give_up_after,
        })
    }

    /// One POST; `Err` says why it did not count as delivered.
    pub(super) async fn post(&self, delivery: &WebhookDelivery, body: &str) -> Result<(), String> {
        let url = Url::parse(&delivery.url).map_err(|e| format!("bad URL: {e}"))?;
        // An address literal never reaches the resolver, nor does any name through a proxy:
        // check it here.
        if self.proxied || matches!(url.host(), Some(url::Host::Ipv4(_) | url::Host::Ipv6(_))) {
            self.policy.check(url.as_str()).await?;
        }
        let timestamp = now_ms() / 1000;
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &delivery.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.secret, &delivery.id, timestamp, body),
            )
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| crate::error_chain::error_chain(&e))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {status}"))
        }
    }

    /// What to record after attempt number `attempts` (1-based) failed at `now`.
    pub(super) fn after_failure(
        &self,
        delivery: &WebhookDelivery,
        now: i64,
        error: String,
    ) -> WebhookAttempt {
        let exponent = u32::try_from(delivery.attempts).unwrap_or(u32::MAX).min(20);
        let wait = self
            .first_retry
            .saturating_mul(1 << exponent)
            .min(MAX_BACKOFF);
        let next_at = now.saturating_add(wait.as_millis() as i64);
        let give_up_at = delivery
            .created_at
            .saturating_add(self.give_up_after.as_millis() as i64);
        if next_at > give_up_at {
            WebhookAttempt::GaveUp { at: now, error }
        } else {
            WebhookAttempt::Retry {
                at: now,
                next_at,
                error,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(url: &str, attempts: i64) -> WebhookDelivery {
        WebhookDelivery {
            id: "msg_x".into(),
            job_id: "j".into(),
            url: url.into(),
            payload: None,
            created_at: 0,
            attempts,
            next_attempt_at: 0,
            delivered_at: None,
            gave_up_at: None,
            last_error: None,
        }
    }

    fn policy(allowed: &[&str]) -> WebhookPolicy {
        WebhookPolicy {
            allowed: allowed
                .iter()
                .map(|n| n.parse().expect("network"))
                .collect(),
        }
    }

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        let default = policy(&[]);
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.20.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!default.allows(internal.parse().expect("ip")), "{internal}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(default.allows(public.parse().expect("ip")), "{public}");
        }
        let loopback = policy(&["127.0.0.1/32"]);
        assert!(loopback.allows("127.0.0.1".parse().expect("ip")));
        assert!(!loopback.allows("127.0.0.2".parse().expect("ip")));
    }

    #[tokio::test]
    async fn submitted_urls_are_checked_before_anything_is_sent() {
        let default = policy(&[]);
        for (url, says) in [
            ("ftp://example.com/", "http or https"),
            ("not a url", "is not a URL"),
            ("http://127.0.0.1:9/hook", "internal"),
            ("http://[::1]/hook", "internal"),
            ("http://localhost/hook", "internal"),
        ] {
            let refused = default.check(url).await.expect_err(url);
            assert!(refused.contains(says), "{url}: {refused}");
        }
        assert!(
            policy(&["127.0.0.0/8", "::1/128"])
                .check("http://localhost:9/hook")
                .await
                .is_ok()
        );
    }

    /// The client connects through the policy: a name that resolves to a refused address is
    /// never connected to, whatever it resolved to at submit.
    #[tokio::test]
    async fn sending_resolves_names_through_the_policy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for stream in listener.incoming().flatten() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut stream = stream;
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer);
                let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n");
            }
        });
        let delivery = delivery(&format!("http://localhost:{port}/hook"), 0);
        let webhooks = |allowed: &[&str]| {
            Webhooks::new(
                WebhookSettings {
                    policy: policy(allowed),
                    first_retry: Duration::from_secs(1),
                    give_up_after: Duration::from_secs(10),
                    proxy: None,
                },
                vec![1u8; 32].into(),
            )
            .expect("client")
        };
        let refused = webhooks(&[])
            .post(&delivery, "{}")
            .await
            .expect_err("refused");
        assert!(refused.contains("internal"), "{refused}");
        // Refused before any connection: the receiver was never reached.
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);
        webhooks(&["127.0.0.1/32", "::1/128"])
            .post(&delivery, "{}")
            .await
            .expect("delivered when allowed");
        // The same receiver, once allowed, is reached: the count above could have moved.
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A receiver that listens on loopback, counts its connections and answers each with
    /// `answer` (`None`: reads and never answers).
    fn receiver(answer: Option<String>) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut held = Vec::new();
            for mut stream in listener.incoming().flatten() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer);
                match &answer {
                    Some(answer) => {
                        let _ = stream.write_all(answer.as_bytes());
                    }
                    None => held.push(stream),
                }
            }
        });
        (port, connections)
    }

    fn loopback_webhooks() -> Webhooks {
        Webhooks::new(
            WebhookSettings {
                policy: policy(&["127.0.0.1/32", "::1/128"]),
                first_retry: Duration::from_secs(1),
                give_up_after: Duration::from_secs(60),
                proxy: None,
            },
            vec![1u8; 32].into(),
        )
        .expect("client")
    }

    /// A redirect is an answer, not 2xx: the attempt failed (to be retried) and the target
    /// of the redirect is never contacted, so a receiver cannot bounce the server elsewhere.
    #[tokio::test]
    async fn redirects_are_not_followed() {
        let (elsewhere, reached) = receiver(Some(
            "HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n".into(),
        ));
        let (port, _) = receiver(Some(format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{elsewhere}/hook\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        )));
        let webhooks = loopback_webhooks();
        let error = webhooks
            .post(&delivery(&format!("http://127.0.0.1:{port}/hook"), 0), "{}")
            .await
            .expect_err("a redirect is not a delivery");
        assert!(error.contains("307"), "{error}");
        assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);
        // It is retried, as any failed attempt.
        let attempt = webhooks.after_failure(&delivery("http://x/", 0), 0, error);
        assert!(
            matches!(attempt, WebhookAttempt::Retry { .. }),
            "{attempt:?}"
        );
    }

    /// A receiver that never answers: the attempt ends at its 10 s timeout as a failure.
    #[tokio::test]
    async fn a_receiver_that_never_answers_fails_the_attempt_at_its_timeout() {
        let (port, connections) = receiver(None);
        let started = std::time::Instant::now();
        let error = loopback_webhooks()
            .post(&delivery(&format!("http://127.0.0.1:{port}/hook"), 0), "{}")
            .await
            .expect_err("no answer is no delivery");
        let took = started.elapsed();
        assert!(took >= ATTEMPT_TIMEOUT, "gave up after {took:?}: {error}");
        assert!(took < ATTEMPT_TIMEOUT * 3, "took {took:?}");
        assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let key: SecretSlice<u8> = STANDARD
            .decode(secret.strip_prefix(SECRET_PREFIX).expect("prefix"))
            .expect("base64")
            .into();
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn retries_back_off_and_stop_when_the_time_is_spent() {
        let webhooks = Webhooks::new(
            WebhookSettings {
                policy: WebhookPolicy::default(),
                first_retry: Duration::from_secs(1),
                give_up_after: Duration::from_secs(10),
                proxy: None,
            },
            vec![1u8; 32].into(),
        )
        .expect("client");
        let next = |attempts, now| match webhooks.after_failure(
            &delivery("http://example.com/", attempts),
            now,
            "x".into(),
        ) {
            WebhookAttempt::Retry { next_at, .. } => Some(next_at),
            _ => None,
        };
        // The first attempt failed: 1 s, then 2 s, then 4 s …
        assert_eq!(next(0, 0), Some(1_000));
        assert_eq!(next(1, 1_000), Some(3_000));
        assert_eq!(next(2, 3_000), Some(7_000));
        // … and none that would start after 10 s.
        assert_eq!(next(3, 7_000), None);
    }
}

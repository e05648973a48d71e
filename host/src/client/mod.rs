//! A client of the REST API, for `wanserve submit`, `wanserve status` and `wanserve cancel`:
//! submit a job, follow its live progress (the SSE stream of `/video/events/{id}`, reconnecting
//! when it drops), and download the finished video.
//!
//! The status types are the server's own (`server::api`), so the two cannot drift apart.

pub mod cli;

use crate::error_chain::error_chain;
use crate::wire::{FieldProblem, StatusResponse, SubmitResponse};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not an http(s) URL")]
    BadServerUrl(String),
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server's own error body: its message and the fields it names.
    #[error("{status}: {message}{}", fields_suffix(fields))]
    Refused {
        status: u16,
        code: String,
        message: String,
        fields: Vec<FieldProblem>,
    },
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("job {id} failed: {reason}")]
    JobFailed { id: String, reason: String },
    #[error("job {id} was cancelled: {reason}")]
    JobCancelled { id: String, reason: String },
    #[error("job {id} succeeded but its video has expired")]
    VideoExpired { id: String },
    #[error("lost the server for {seconds} s while following job {id}: {reason}")]
    LostServer {
        id: String,
        seconds: u64,
        reason: String,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

fn fields_suffix(fields: &[FieldProblem]) -> String {
    fields
        .iter()
        .map(|f| format!("\n  {}: {}", f.field, f.reason))
        .collect()
}

/// The server's error body (`wire::ErrorBody`, read back).
#[derive(Deserialize)]
struct ErrorWire {
    error: ErrorWireDetail,
}

#[derive(Deserialize)]
struct ErrorWireDetail {
    code: String,
    message: String,
    #[serde(default)]
    fields: Vec<FieldProblem>,
}

/// How long `follow` keeps trying to reach the server again after its stream dropped (a
/// restart loads the model before it answers).
const RECONNECT_FOR: Duration = Duration::from_secs(180);

pub struct Client {
    http: reqwest::Client,
    server: Url,
    api_key: SecretString,
}

impl Client {
    pub fn new(server: &str, api_key: SecretString) -> Result<Self, ClientError> {
        let mut server =
            Url::parse(server).map_err(|_| ClientError::BadServerUrl(server.to_string()))?;
        if !matches!(server.scheme(), "http" | "https") || server.cannot_be_a_base() {
            return Err(ClientError::BadServerUrl(server.to_string()));
        }
        // `join` replaces the last segment of a base without a trailing slash.
        if !server.path().ends_with('/') {
            server.set_path(&format!("{}/", server.path()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("wanserve-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::Unreachable {
                url: server.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Client {
            http,
            server,
            api_key,
        })
    }

    fn endpoint(&self, path: &str) -> Url {
        self.server
            .join(path)
            .expect("a relative path joins onto an http base")
    }

    fn authorized(&self, builder: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        builder.bearer_auth(self.api_key.expose_secret())
    }

    /// Submits `body` (the seed's submit fields) and returns the request id.
    pub async fn submit(
        &self,
        body: &serde_json::Value,
        idempotency_key: Option<&str>,
    ) -> Result<String, ClientError> {
        let url = self.endpoint("video/submit");
        let mut request = self.authorized(self.http.post(url.clone())).json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        let response: SubmitResponse = read_json(&url, send(&url, request).await?).await?;
        Ok(response.request_id)
    }

    pub async fn status(&self, id: &str) -> Result<StatusResponse, ClientError> {
        let url = self.endpoint("video/status");
        let request = self
            .authorized(self.http.post(url.clone()))
            .json(&serde_json::json!({ "requestId": id }));
        read_json(&url, send(&url, request).await?).await
    }

    pub async fn cancel(&self, id: &str) -> Result<(), ClientError> {
        let url = self.endpoint("video/cancel");
        let request = self
            .authorized(self.http.post(url.clone()))
            .json(&serde_json::json!({ "requestId": id }));
        let _: serde_json::Value = read_json(&url, send(&url, request).await?).await?;
        Ok(())
    }

    /// Follows job `id` until it reaches a final state, calling `on_status` with each status
    /// (the current one first), and returns the final one. A dropped stream (network, server
    /// restart, another host) is reopened; the server sends the current state first, so
    /// nothing is missed but a repeat is possible.
    pub async fn follow(
        &self,
        id: &str,
        mut on_status: impl FnMut(&StatusResponse),
    ) -> Result<StatusResponse, ClientError> {
        let url = self.endpoint(&format!("video/events/{id}"));
        let mut lost_since: Option<(Instant, String)> = None;
        let mut pause = Duration::from_millis(250);
        loop {
            let attempt = self
                .follow_once(&url, &mut on_status, &mut lost_since)
                .await;
            let reason = match attempt {
                Ok(Some(last)) => return Ok(last),
                Ok(None) => "the stream ended before the job did".to_string(),
                // A refusal (401, 404) will not change by retrying.
                Err(error @ ClientError::Refused { .. }) => return Err(error),
                Err(error) => error.to_string(),
            };
            let since = lost_since.get_or_insert_with(|| (Instant::now(), String::new()));
            since.1 = reason;
            if since.0.elapsed() > RECONNECT_FOR {
                return Err(ClientError::LostServer {
                    id: id.to_string(),
                    seconds: since.0.elapsed().as_secs(),
                    reason: since.1.clone(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection: `Some(final status)`, or `None` when the stream ended before it.
    async fn follow_once(
        &self,
        url: &Url,
        on_status: &mut impl FnMut(&StatusResponse),
        lost_since: &mut Option<(Instant, String)>,
    ) -> Result<Option<StatusResponse>, ClientError> {
        let request = self
            .authorized(self.http.get(url.clone()))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let response = check(url, send(url, request).await?).await?;
        *lost_since = None;
        let mut events = response.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| ClientError::Unreachable {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
            if event.event != "status" {
                continue;
            }
            let status: StatusResponse =
                serde_json::from_str(&event.data).map_err(|e| ClientError::Protocol {
                    url: url.to_string(),
                    reason: format!("a status event that is not a status: {e}"),
                })?;
            on_status(&status);
            if status.status.is_final() {
                return Ok(Some(status));
            }
        }
        Ok(None)
    }

    /// Downloads a video URL to `path` and returns its size. The URL is signed (or presigned
    /// by the object store), so no API key is sent with it: it may be another host's. The file
    /// appears complete or not at all (written beside `path`, then renamed).
    pub async fn download(&self, video_url: &str, path: &Path) -> Result<u64, ClientError> {
        let url = self
            .server
            .join(video_url)
            .map_err(|e| ClientError::Protocol {
                url: video_url.to_string(),
                reason: format!("not a video URL: {e}"),
            })?;
        let response = check(&url, send(&url, self.http.get(url.clone())).await?).await?;
        let write_error = |e: std::io::Error| ClientError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let partial = partial_path(path);
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(write_error)?;
        let expected = response.content_length();
        let mut written = 0u64;
        let mut body = response.bytes_stream();
        let copied: Result<(), ClientError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ClientError::Unreachable {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
                file.write_all(&chunk).await.map_err(write_error)?;
                written += chunk.len() as u64;
            }
            if let Some(expected) = expected.filter(|&n| n != written) {
                return Err(ClientError::Protocol {
                    url: url.to_string(),
                    reason: format!("the video ended after {written} of {expected} bytes"),
                });
            }
            file.sync_all().await.map_err(write_error)?;
            tokio::fs::rename(&partial, path).await.map_err(write_error)
        }
        .await;
        if copied.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        copied.map(|()| written)
    }
}

/// `out.mp4` → `out.mp4.partial` in the same directory (so the rename is atomic), as
/// `wanserve generate` does.
fn partial_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "video.mp4".into());
    path.with_file_name(format!("{name}.partial"))
}

async fn send(
    url: &Url,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, ClientError> {
    request.send().await.map_err(|e| ClientError::Unreachable {
        url: url.to_string(),
        reason: error_chain(&e),
    })
}

/// The response when it is a success, else the server's error as `Refused`.
async fn check(url: &Url, response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    Err(match serde_json::from_str::<ErrorWire>(&text) {
        Ok(wire) => ClientError::Refused {
            status: status.as_u16(),
            code: wire.error.code,
            message: wire.error.message,
            fields: wire.error.fields,
        },
        // Not this server's error body (a proxy's page, an object store's XML).
        Err(_) => ClientError::Refused {
            status: status.as_u16(),
            code: String::new(),
            message: format!(
                "{} from {url}",
                status.canonical_reason().unwrap_or("error")
            ),
            fields: Vec::new(),
        },
    })
}

async fn read_json<T: serde::de::DeserializeOwned>(
    url: &Url,
    response: reqwest::Response,
) -> Result<T, ClientError> {
    let response = check(url, response).await?;
    let bytes = response
        .bytes()
        .await
        .map_err(|e| ClientError::Unreachable {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
        url: url.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_keep_their_path_and_refuse_other_schemes() {
        let client = Client::new("http://h:8088/wan", SecretString::from("k")).expect("valid");
        assert_eq!(
            client.endpoint("video/submit").as_str(),
            "http://h:8088/wan/video/submit"
        );
        assert!(Client::new("ftp://h/", SecretString::from("k")).is_err());
        assert!(Client::new("h:8088", SecretString::from("k")).is_err());
    }

    #[test]
    fn partial_downloads_sit_beside_their_file() {
        assert_eq!(
            partial_path(Path::new("/tmp/out.mp4")),
            Path::new("/tmp/out.mp4.partial")
        );
    }

    #[test]
    fn refusals_name_every_field() {
        let error = ClientError::Refused {
            status: 422,
            code: "invalid_request".into(),
            message: "2 fields are invalid".into(),
            fields: vec![
                FieldProblem {
                    field: "num_frames".into(),
                    reason: "must be 24 to 120".into(),
                },
                FieldProblem {
                    field: "prompt".into(),
                    reason: "is required".into(),
                },
            ],
        };
        assert_eq!(
            error.to_string(),
            "422: 2 fields are invalid\n  num_frames: must be 24 to 120\n  prompt: is required"
        );
    }
}

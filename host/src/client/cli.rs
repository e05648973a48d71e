//! `wanserve submit`, `wanserve status`, `wanserve cancel`: the client commands' arguments and
//! what they print. Results go to standard output (a request id, a status as JSON), progress
//! and messages to standard error.

use super::{Client, ClientError};
use crate::wire::{StatusName, StatusResponse};
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::SecretString;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "WANSERVE_SERVER", default_value = "http://127.0.0.1:8088")]
    server: String,
    /// The API key, sent as a Bearer token. Prefer the environment variable: a command line
    /// is visible to other users of the machine.
    #[arg(long, env = "WANSERVE_API_KEY", hide_env_values = true)]
    api_key: String,
}

impl ServerArgs {
    fn client(self) -> Result<Client, ClientError> {
        Client::new(&self.server, SecretString::from(self.api_key))
    }
}

#[derive(clap::Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// What the video shows (10–500 characters).
    #[arg(long)]
    prompt: String,
    /// What the video should not show.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// WIDTHxHEIGHT: 832x480 (landscape) or 480x832 (portrait).
    #[arg(long, default_value = "832x480")]
    image_size: String,
    /// Frames in the video (24–120).
    #[arg(long, default_value_t = 81)]
    num_frames: u32,
    /// Text guidance strength (1.0–20.0).
    #[arg(long, default_value_t = 5.0)]
    guidance_scale: f32,
    /// Denoising steps (20–100).
    #[arg(long, default_value_t = 50)]
    infer_steps: u32,
    /// Random seed (0–2147483647); the server draws one when absent.
    #[arg(long)]
    seed: Option<u32>,
    #[arg(long, default_value = "Wan2.1-T2V-1.3B")]
    model: String,
    /// Submitting again with the same key (and body) returns the same job instead of a new one:
    /// safe to retry after a network error.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// A URL the server POSTs the final status to (signed; see the README).
    #[arg(long)]
    webhook: Option<String>,
    /// Step caching: off, fast or faster (default: the server's).
    #[arg(long, value_enum)]
    cache: Option<crate::pipeline::step_cache::CacheMode>,
    /// Follow the job to its end (progress on standard error) and download the video.
    #[arg(long)]
    wait: bool,
    /// Where to write the video (implies --wait; default with --wait: <requestId>.mp4).
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct JobArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The job's requestId (from submit).
    request_id: String,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

pub fn submit(args: SubmitArgs) -> Result<(), String> {
    let mut body = serde_json::json!({
        "model": args.model,
        "prompt": args.prompt,
        "image_size": args.image_size,
        "num_frames": args.num_frames,
        "guidance_scale": args.guidance_scale,
        "infer_steps": args.infer_steps,
    });
    if let Some(seed) = args.seed {
        body["seed"] = seed.into();
    }
    if let Some(cache) = args.cache {
        body["cache"] = cache.as_str().into();
    }
    if let Some(negative) = args.negative_prompt {
        body["negative_prompt"] = negative.into();
    }
    if let Some(webhook) = args.webhook {
        body["webhook"] = webhook.into();
    }
    let wait = args.wait || args.output.is_some();
    let output = args.output;
    let idempotency_key = args.idempotency_key;
    let client = args.server.client().map_err(|e| e.to_string())?;
    runtime()?.block_on(async {
        let id = client
            .submit(&body, idempotency_key.as_deref())
            .await
            .map_err(|e| e.to_string())?;
        println!("{id}");
        if !wait {
            return Ok(());
        }
        let output = output.unwrap_or_else(|| PathBuf::from(format!("{id}.mp4")));
        let done = follow_with_progress(&client, &id).await?;
        let url = done
            .results
            .videos
            .first()
            .map(|v| v.url.clone())
            .ok_or_else(|| ClientError::VideoExpired { id: id.clone() }.to_string())?;
        let bytes = client
            .download(&url, &output)
            .await
            .map_err(|e| e.to_string())?;
        let seconds = done
            .results
            .timings
            .inference
            .map(|s| format!(" in {s:.1} s"))
            .unwrap_or_default();
        eprintln!(
            "wrote {} ({bytes} bytes; seed {}; generated{seconds})",
            output.display(),
            done.seed
        );
        Ok(())
    })
}

/// Follows the job with a progress bar (a line per change when standard error is not a
/// terminal) and returns its final status when it succeeded; an error otherwise.
async fn follow_with_progress(client: &Client, id: &str) -> Result<StatusResponse, String> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template("{msg:<24} [{bar:30}] {pos}/{len} {elapsed_precise}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let lines = bar.is_hidden();
    let mut last_line = String::new();
    let done = client
        .follow(id, |status| {
            let line = describe(status);
            if lines {
                if line != last_line {
                    eprintln!("{line}");
                    last_line = line;
                }
                return;
            }
            match &status.progress {
                Some(p) => {
                    bar.set_length(u64::from(p.total.max(1)));
                    bar.set_position(u64::from(p.step));
                }
                None => bar.set_position(0),
            }
            bar.set_message(line);
        })
        .await;
    bar.finish_and_clear();
    let done = done.map_err(|e| e.to_string())?;
    let reason = || done.reason.clone().unwrap_or_default();
    match done.status {
        StatusName::Succeed if done.expired => Err(ClientError::VideoExpired { id: id.into() }),
        StatusName::Succeed => return Ok(done),
        StatusName::Cancelled => Err(ClientError::JobCancelled {
            id: id.into(),
            reason: reason(),
        }),
        _ => Err(ClientError::JobFailed {
            id: id.into(),
            reason: reason(),
        }),
    }
    .map_err(|e| e.to_string())
}

/// One line for a status: `queued (position 2)`, `denoising 5/20, ETA 12 s`, `Succeed`.
fn describe(status: &StatusResponse) -> String {
    match (status.status, &status.progress) {
        (StatusName::InQueue, _) => match status.position {
            Some(position) => format!("queued (position {position})"),
            None => "queued".into(),
        },
        (StatusName::InProgress, Some(p)) => {
            let eta = status
                .eta_seconds
                .map(|s| format!(", ETA {s:.0} s"))
                .unwrap_or_default();
            format!("{} {}/{}{eta}", p.stage, p.step, p.total)
        }
        (StatusName::InProgress, None) => "starting".into(),
        (name, _) => format!("{name:?}"),
    }
}

pub fn status(args: JobArgs) -> Result<(), String> {
    let client = args.server.client().map_err(|e| e.to_string())?;
    let status = runtime()?
        .block_on(client.status(&args.request_id))
        .map_err(|e| e.to_string())?;
    let json = serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?;
    println!("{json}");
    Ok(())
}

pub fn cancel(args: JobArgs) -> Result<(), String> {
    let client = args.server.client().map_err(|e| e.to_string())?;
    runtime()?
        .block_on(client.cancel(&args.request_id))
        .map_err(|e| e.to_string())?;
    eprintln!("cancelled {}", args.request_id);
    Ok(())
}

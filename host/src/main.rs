use clap::{Parser, Subcommand};

// Every plugin call allocates and frees a store and its instance on the host; mimalloc makes
// that ~1 µs cheaper per auth + validate pair than glibc (benches/plugins.rs uses it too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use wanserve::client;
use wanserve::engine::{ModelArgs, ModelTable, load_pipeline, render};
use wanserve::model::ModelDir;
use wanserve::pipeline::step_cache::CacheMode;
use wanserve::pipeline::{CancelToken, GenerateRequest, Progress, Stage};
use wanserve::plugins::api_keys::hash_key;
use wanserve::plugins::config::{ConfigSource, StoredSwaps, start_plugins};
use wanserve::plugins::{PluginHost, PluginLimits, Slot, WIT_VERSION};
use wanserve::server::config::{ServeArgs, ServeConfig};
use wanserve::video::H264;

/// What a command ends with: its error is printed as `error: …`.
type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "wanserve",
    version,
    about = "Text-to-video with Wan2.1 over ONNX Runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (for people) or JSON objects, one per line, with the span fields
    /// (request ids, job attempt) on each (for log shippers). Levels: RUST_LOG.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "WANSERVE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Generate one video from a prompt and write it as an H.264 mp4.
    Generate(GenerateArgs),
    /// Serve the REST API (the seed's /video endpoints, docs at /docs) until SIGTERM/Ctrl-C.
    Serve(Box<ServeArgs>),
    /// Policy plugins (WebAssembly components).
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Submit a job to a server; prints its requestId (with --wait: follows it with a progress
    /// bar and downloads the video).
    Submit(Box<client::cli::SubmitArgs>),
    /// Print a job's status as JSON.
    Status(client::cli::JobArgs),
    /// Cancel a job (queued: it leaves the queue; running: it stops before its next step).
    Cancel(client::cli::JobArgs),
    /// Measure a model's step-cache (MagCache) magnitude ratios, as diffusers'
    /// `MagCacheConfig(calibrate=True)` does; prints them as JSON, and with --write stores them
    /// in the model's manifest.
    CalibrateCache(CalibrateArgs),
}

#[derive(clap::Args)]
struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(
        long,
        default_value = "A beautiful sunset over the mountains, golden light on the snow"
    )]
    prompt: String,
    /// WIDTHxHEIGHT of the calibration run (MagCache calibrated Wan2.1-1.3B at 832x480).
    #[arg(long, value_parser = parse_size, default_value = "832x480")]
    image_size: (usize, usize),
    #[arg(long, default_value_t = 81)]
    num_frames: usize,
    /// Steps of the calibration run: the ratios' length (other step counts are resampled).
    #[arg(long, default_value_t = 50)]
    infer_steps: usize,
    #[arg(long, default_value_t = 5.0)]
    guidance_scale: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Store the ratios in <model-dir>/wanserve-model.json (`step_cache`).
    #[arg(long)]
    write: bool,
}

fn calibrate_cache(args: CalibrateArgs) -> CliResult {
    let settings = args.model.resolve(ModelTable::default())?;
    let model_dir = settings.model_dir();
    let model = ModelDir::open_with(&model_dir, settings.verify_model)?;
    let pipeline = load_pipeline(&model, &settings)?;
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: String::new(),
        width: args.image_size.0,
        height: args.image_size.1,
        num_frames: args.num_frames,
        infer_steps: args.infer_steps,
        guidance_scale: args.guidance_scale,
        seed: args.seed,
        cache: CacheMode::Off,
    };
    let bar = ProgressBar::new(args.infer_steps as u64);
    let ratios = pipeline.calibrate_step_cache(&request, &mut |p| {
        if p.stage == Stage::Denoising {
            bar.set_position(p.step as u64);
        }
    });
    bar.finish_and_clear();
    let ratios = ratios?;
    let (w, h) = args.image_size;
    let spec = serde_json::json!({
        "method": "magcache",
        "calibrated_steps": args.infer_steps,
        "ratios": ratios,
        "source": format!(
            "wanserve calibrate-cache, {w}x{h}, {} frames, {} steps, guidance {}, seed {}",
            args.num_frames, args.infer_steps, args.guidance_scale, args.seed
        ),
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&spec).unwrap_or_default()
    );
    if args.write {
        let path = model_dir.join("wanserve-model.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut manifest: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        let object = manifest
            .as_object_mut()
            .ok_or_else(|| format!("{} is not a JSON object", path.display()))?;
        object.insert("step_cache".into(), spec);
        // Written beside and renamed over, so a failure leaves the old manifest whole.
        let temp = path.with_extension("json.partial");
        let body = serde_json::to_string_pretty(&manifest)? + "\n";
        std::fs::write(&temp, body).map_err(|e| format!("cannot write {}: {e}", temp.display()))?;
        std::fs::rename(&temp, &path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
        eprintln!("wrote the ratios into {}", path.display());
    }
    Ok(())
}

fn serve(args: ServeArgs) -> CliResult {
    let config = ServeConfig::resolve(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("wanserve-http")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    Ok(runtime.block_on(wanserve::server::serve(config))?)
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check that a component fits a slot and passes its self-test (installs nothing).
    Check {
        /// The slot the component is meant for.
        #[arg(long, value_enum)]
        slot: Slot,
        /// The component (.wasm).
        file: PathBuf,
        /// A config entry the plugin's self-test sees, as KEY=VALUE (repeatable).
        #[arg(long = "config", value_parser = parse_config_entry)]
        config: Vec<(String, String)>,
    },
    /// Load every slot as the server would (config file, environment, plugin directory), print
    /// what is installed, and print a generated API key when none is configured.
    Load {
        /// The server's TOML config file (its [plugins] table).
        #[arg(long, env = "WANSERVE_CONFIG")]
        config: Option<PathBuf>,
        /// Where the server keeps its state (the generated API key's hash goes here).
        #[arg(long, env = "WANSERVE_DATA_DIR", default_value = "data")]
        data_dir: PathBuf,
    },
    /// Write a new plugin crate for a slot: builds anywhere with `cargo build --release`
    /// (WIT, allocator and build settings included) and passes `plugin check` as written.
    New {
        /// The crate's name (a-z, 0-9, - and _).
        name: String,
        #[arg(long, value_enum)]
        slot: Slot,
        /// Where to write it [default: ./NAME]; must be empty or missing.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Print the SHA-256 of an API key read from standard input, for the auth plugin's
    /// `api_keys` config (`name=<hash>`); the key itself is never stored.
    HashKey,
}

fn parse_config_entry(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn plugin(command: PluginCommand) -> CliResult {
    match command {
        PluginCommand::Check { slot, file, config } => {
            let bytes =
                std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let host = PluginHost::new(PluginLimits::default())?;
            let info = host
                .check(slot, &bytes, config.into_iter().collect())
                .map_err(|e| format!("{}: {e}", file.display()))?;
            println!("slot:    {}", info.slot);
            println!("world:   {}", info.world);
            // Components carry no version of their own (cargo's is stripped); the version that
            // matters for compatibility is the WIT package's, which the world check pinned.
            println!("version: wanserve:policy {WIT_VERSION}");
            println!("sha256:  {}", info.sha256);
            println!("size:    {} bytes", info.size);
            println!("self-test: passed");
            Ok(())
        }
        PluginCommand::Load { config, data_dir } => {
            let source =
                ConfigSource::new(config.as_deref(), &data_dir, |var| std::env::var(var).ok());
            let started = start_plugins(
                &source,
                &StoredSwaps::default(),
                &[wanserve::wire::DEFAULT_MODEL.to_string()],
            )?;
            for info in &started.installed {
                println!(
                    "{:<12} {}  {}",
                    info.slot.to_string(),
                    info.sha256,
                    info.world
                );
            }
            if let Some(key) = started.generated_key {
                println!(
                    "No API key was configured; generated one (shown only now, stored hashed in {}):",
                    data_dir.display()
                );
                println!("{key}");
            }
            Ok(())
        }
        PluginCommand::New { name, slot, dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            wanserve::plugins::scaffold::write(&dir, &name, slot)?;
            println!(
                "wrote {} ({slot} plugin); next, in that directory:",
                dir.display()
            );
            println!("  cargo build --release");
            println!(
                "  wanserve plugin check --slot {slot} target/wasm32-unknown-unknown/release/{}.wasm",
                name.replace('-', "_")
            );
            println!("  (its README.md says how to deploy it)");
            Ok(())
        }
        PluginCommand::HashKey => {
            let mut key = String::new();
            std::io::stdin()
                .read_line(&mut key)
                .map_err(|e| format!("cannot read the key: {e}"))?;
            let key = key.trim_end_matches(['\n', '\r']);
            if key.is_empty() {
                return Err("no key on standard input".into());
            }
            println!("{}", hash_key(key));
            Ok(())
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// What the video shows.
    #[arg(long)]
    prompt: String,
    /// What the video should not show (classifier-free guidance's negative prompt).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// WIDTHxHEIGHT, e.g. 832x480 (landscape) or 480x832 (portrait).
    #[arg(long, value_parser = parse_size)]
    image_size: (usize, usize),
    /// Frames in the output video (the model generates the next 4k+1 and the rest are dropped).
    #[arg(long)]
    num_frames: usize,
    /// Denoising steps.
    #[arg(long)]
    infer_steps: usize,
    /// Classifier-free guidance strength; 1.0 or less turns guidance off.
    #[arg(long)]
    guidance_scale: f32,
    /// Random seed; the same seed gives the same video (drawn at random when absent, and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where to write the mp4.
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// Also write the final latents (before VAE decoding) as a float32 .npy file.
    #[arg(long)]
    dump_latents: Option<PathBuf>,
    /// Step caching (MagCache): `fast` and `faster` skip the transformer's blocks on steps the
    /// model's magnitude ratios allow (see ARCHITECTURE.md); `off` runs every step in full.
    #[arg(long, value_enum, default_value = "off")]
    cache: wanserve::pipeline::step_cache::CacheMode,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?} is not WIDTHxHEIGHT"))?;
    let parse = |v: &str, what: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: {what} {v:?} is not a whole number"))
    };
    Ok((parse(w, "width")?, parse(h, "height")?))
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) % (1 << 31)
}

fn generate(args: GenerateArgs) -> CliResult {
    let seed = args.seed.unwrap_or_else(random_seed);
    let request = GenerateRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        width: args.image_size.0,
        height: args.image_size.1,
        num_frames: args.num_frames,
        infer_steps: args.infer_steps,
        guidance_scale: args.guidance_scale,
        seed,
        cache: args.cache,
    };
    let settings = args.model.resolve(ModelTable::default())?;
    let model = ModelDir::open_with(&settings.model_dir(), settings.verify_model)?;
    let pipeline = load_pipeline(&model, &settings)?;
    pipeline.plan(&request)?;
    if let Some(parent) = args.output.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        return Err(format!("output directory {} does not exist", parent.display()).into());
    }

    let bar = ProgressBar::new(request.infer_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>13} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut on_progress = |p: Progress| {
        let label = p.stage.as_str();
        if bar.message() != label {
            bar.set_message(label);
            bar.set_length(p.total as u64);
            bar.reset_eta();
        }
        bar.set_position(p.step as u64);
    };
    let rendered = render(
        &pipeline,
        &H264::default(),
        &request,
        &args.output,
        &CancelToken::default(),
        &mut on_progress,
    );
    bar.finish_and_clear();
    let rendered = rendered?;
    if let Some(path) = &args.dump_latents {
        ndarray_npy::write_npy(path, &rendered.latents)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    eprintln!(
        "wrote {} ({} frames, {}x{}, seed {seed})",
        rendered.path.display(),
        rendered.frames,
        request.width,
        request.height
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Without RUST_LOG a server logs what an operator needs (start-up, jobs, refusals); the
    // one-shot commands only warnings.
    let default_filter = match cli.command {
        Command::Serve(_) => "wanserve=info,warn",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Each line one JSON object: the event's fields, its span's and its parents'.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve(*args),
        Command::Plugin(command) => plugin(command),
        Command::Submit(args) => client::cli::submit(*args).map_err(Into::into),
        Command::Status(args) => client::cli::status(args).map_err(Into::into),
        Command::Cancel(args) => client::cli::cancel(args).map_err(Into::into),
        Command::CalibrateCache(args) => calibrate_cache(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

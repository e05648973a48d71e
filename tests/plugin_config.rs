//! Slot configuration (TOML + environment), start-up from a plugin directory, hot swap by
//! watching that directory, and the `plugin load` / `plugin hash-key` commands.

mod common;

use common::{plugin_caller, plugin_wasm, stderr, valid_submit_body, wanserve};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wanserve::plugins::config::{ConfigSource, PluginsConfig, StoredSwaps, start_plugins};
use wanserve::plugins::watch::PluginWatcher;
use wanserve::plugins::{JsonValue, PluginError, PluginHost, PluginLimits, Slot, json_fields};

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Send + Sync + 'static {
    let vars: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| vars.get(name).cloned()
}

/// A plugin directory holding the three default components under their default names.
fn default_plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (crate_name, slot) in [
        ("auth-apikey", Slot::Auth),
        ("validate-seed", Slot::Validate),
        ("postprocess-retention", Slot::Postprocess),
    ] {
        std::fs::copy(
            plugin_wasm(crate_name),
            dir.path().join(slot.default_file()),
        )
        .unwrap();
    }
    dir
}

#[test]
fn toml_then_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wanserve.toml");
    std::fs::write(
        &file,
        r#"
[server]
port = 8088

[plugins]
dir = "/srv/plugins"
memory_mib = 32

[plugins.auth]
file = "my_auth.wasm"
deadline_ms = 20
[plugins.auth.config]
jwt_algorithm = "RS256"

[plugins.postprocess.config]
retention_seconds = "7200"
"#,
    )
    .unwrap();
    let config = PluginsConfig::load(Some(&file), env(&[])).unwrap();
    assert_eq!(config.dir, Path::new("/srv/plugins"));
    assert_eq!(config.limits.memory_bytes, 32 << 20);
    let auth = config.slot(Slot::Auth).unwrap();
    assert_eq!(auth.path, Path::new("/srv/plugins/my_auth.wasm"));
    assert_eq!(auth.deadline, Duration::from_millis(20));
    assert_eq!(auth.config["jwt_algorithm"], "RS256");
    let validate = config.slot(Slot::Validate).unwrap();
    assert_eq!(validate.path, Path::new("/srv/plugins/validate_seed.wasm"));
    assert_eq!(validate.deadline, PluginLimits::default().deadline);
    assert_eq!(
        config.slot(Slot::Postprocess).unwrap().config["retention_seconds"],
        "7200"
    );

    let config = PluginsConfig::load(
        Some(&file),
        env(&[
            ("WANSERVE_PLUGIN_DIR", "/opt/p"),
            ("WANSERVE_AUTH_DEADLINE_MS", "7"),
            ("WANSERVE_VALIDATE_PLUGIN", "strict.wasm"),
        ]),
    )
    .unwrap();
    assert_eq!(
        config.slot(Slot::Auth).unwrap().path,
        Path::new("/opt/p/my_auth.wasm")
    );
    assert_eq!(
        config.slot(Slot::Auth).unwrap().deadline,
        Duration::from_millis(7)
    );
    assert_eq!(
        config.slot(Slot::Validate).unwrap().path,
        Path::new("/opt/p/strict.wasm")
    );

    // Mistakes name where they are.
    std::fs::write(&file, "[plugins.auth]\nfiel = \"x.wasm\"\n").unwrap();
    let err = PluginsConfig::load(Some(&file), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("wanserve.toml") && err.contains("fiel"),
        "{err}"
    );
    let err = PluginsConfig::load(None, env(&[("WANSERVE_AUTH_DEADLINE_MS", "soon")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("WANSERVE_AUTH_DEADLINE_MS") && err.contains("soon"),
        "{err}"
    );
    let err = PluginsConfig::load(None, env(&[("WANSERVE_VALIDATE_DEADLINE_MS", "0")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("plugins.validate.deadline_ms") && err.contains("at least 1"),
        "{err}"
    );
    let err = PluginsConfig::load(Some(&dir.path().join("missing.toml")), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.toml"), "{err}");
}

#[test]
fn start_installs_every_slot_from_the_directory() {
    let plugins = default_plugin_dir();
    let data = tempfile::tempdir().unwrap();
    let vars = [
        ("WANSERVE_PLUGIN_DIR", plugins.path().to_str().unwrap()),
        ("WANSERVE_API_KEYS", "k-123456"),
    ];
    let started = start_plugins(
        &ConfigSource::new(None, data.path(), env(&vars)),
        &StoredSwaps::default(),
        &[wanserve::wire::DEFAULT_MODEL.to_string()],
    )
    .unwrap();
    assert_eq!(started.installed.len(), 3);
    assert!(
        started.generated_key.is_none(),
        "WANSERVE_API_KEYS seeds the key list"
    );
    for slot in Slot::ALL {
        assert!(started.host.installed(slot).is_some(), "{slot}");
    }

    // A missing component names its slot and path.
    std::fs::remove_file(plugins.path().join("postprocess_retention.wasm")).unwrap();
    let err = start_plugins(
        &ConfigSource::new(None, data.path(), env(&vars)),
        &StoredSwaps::default(),
        &[wanserve::wire::DEFAULT_MODEL.to_string()],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("postprocess") && err.contains("postprocess_retention.wasm"),
        "{err}"
    );
}

fn good_body() -> Vec<(String, JsonValue)> {
    json_fields(&valid_submit_body())
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replaces `path` the way deploy tools do: write beside it, then rename over it.
fn deploy(path: &Path, bytes: &[u8]) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, bytes).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// A plugin directory with the default plugins, a host serving its validate plugin, and a
/// watcher on the directory.
fn watched_validate_slot() -> (tempfile::TempDir, Arc<PluginHost>, PluginWatcher) {
    let plugins = default_plugin_dir();
    let config = PluginsConfig::load(
        None,
        env(&[("WANSERVE_PLUGIN_DIR", plugins.path().to_str().unwrap())]),
    )
    .unwrap();
    let host = Arc::new(PluginHost::new(PluginLimits::default()).unwrap());
    host.install(config.slot(Slot::Validate).unwrap()).unwrap();
    let watcher = PluginWatcher::start(host.clone(), &config, None).unwrap();
    (plugins, host, watcher)
}

#[test]
fn the_watched_directory_swaps_good_files_and_ignores_broken_ones() {
    let (plugins, host, watcher) = watched_validate_slot();
    let validator = plugins.path().join("validate_seed.wasm");
    let original = host.installed(Slot::Validate).unwrap().sha256;

    // A broken file (here: truncated mid-copy) is refused; the old plugin keeps serving.
    let bytes = std::fs::read(&validator).unwrap();
    std::fs::write(&validator, &bytes[..bytes.len() / 2]).unwrap();
    wait_for("the broken file to be refused", || {
        watcher.last_error(Slot::Validate).is_some()
    });
    let why = watcher.last_error(Slot::Validate).unwrap();
    assert!(
        why.contains("validate") && why.contains("not a WebAssembly component"),
        "{why}"
    );
    assert_eq!(host.installed(Slot::Validate).unwrap().sha256, original);
    assert!(
        host.validate(&plugin_caller(), &good_body())
            .unwrap()
            .is_ok()
    );
    assert_eq!(watcher.swaps(), 0);

    // Files of other names are none of the watcher's business.
    std::fs::write(plugins.path().join("notes.txt"), "hello").unwrap();

    // A good replacement is swapped in, and the error is cleared.
    deploy(
        &validator,
        &std::fs::read(plugin_wasm("test-trap")).unwrap(),
    );
    wait_for("the new plugin to serve", || watcher.swaps() == 1);
    assert!(watcher.last_error(Slot::Validate).is_none());
    assert!(matches!(
        host.validate(&plugin_caller(), &good_body()),
        Err(PluginError::Trapped { .. })
    ));
    assert!(
        host.installed(Slot::Auth).is_none(),
        "only the changed slot is touched"
    );

    // Putting the old file back swaps back.
    deploy(&validator, &bytes);
    wait_for("the original to serve again", || watcher.swaps() == 2);
    assert_eq!(host.installed(Slot::Validate).unwrap().sha256, original);
}

/// Reading a plugin file (another server starting, a backup tool) is not a change: a plugin
/// installed by other means (the admin API) keeps serving.
#[test]
fn opening_a_watched_file_does_not_undo_an_uploaded_plugin() {
    let (plugins, host, watcher) = watched_validate_slot();
    let validator = plugins.path().join("validate_seed.wasm");
    // What `PUT /admin/plugins/validate` does.
    host.replace(
        Slot::Validate,
        &std::fs::read(plugin_wasm("test-trap")).unwrap(),
        Default::default(),
    )
    .unwrap();
    let uploaded = host.installed(Slot::Validate).unwrap().sha256;
    for _ in 0..3 {
        let _ = std::fs::read(&validator).unwrap();
    }
    std::thread::sleep(wanserve::plugins::watch::DEBOUNCE * 4);
    assert_eq!(host.installed(Slot::Validate).unwrap().sha256, uploaded);
    assert_eq!(watcher.swaps(), 0);

    // A real change to the file still installs it.
    let permissive = std::fs::read(plugin_wasm("test-permissive")).unwrap();
    deploy(&validator, &permissive);
    wait_for("the file's plugin to serve", || watcher.swaps() == 1);
    assert_eq!(
        host.installed(Slot::Validate).unwrap().sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&permissive))
    );
}

#[test]
fn plugin_load_prints_a_generated_key_once_and_hash_key_hashes() {
    let plugins = default_plugin_dir();
    let data = tempfile::tempdir().unwrap();
    let load = || {
        wanserve()
            .args(["plugin", "load", "--data-dir"])
            .arg(data.path())
            .env("WANSERVE_PLUGIN_DIR", plugins.path())
            .env_remove("WANSERVE_API_KEYS")
            .env_remove("WANSERVE_CONFIG")
            .output()
            .unwrap()
    };
    let first = load();
    assert!(first.status.success(), "{}", stderr(&first));
    let out = String::from_utf8_lossy(&first.stdout).to_string();
    let key = out
        .lines()
        .find(|l| l.starts_with("wsk_"))
        .unwrap_or_else(|| panic!("no generated key in {out}"))
        .to_string();
    for world in [
        "auth-plugin",
        "validate-admission-plugin",
        "postprocess-plugin",
    ] {
        assert!(out.contains(world), "{out}");
    }
    assert!(
        !stderr(&first).contains(&key),
        "the key is printed on stdout only"
    );

    let second = load();
    assert!(second.status.success());
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("wsk_"),
        "printed once"
    );

    let mut hash = wanserve()
        .args(["plugin", "hash-key"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(hash.stdin.take().unwrap(), "{key}").unwrap();
    let hashed = hash.wait_with_output().unwrap();
    let hashed = String::from_utf8_lossy(&hashed.stdout).trim().to_string();
    let stored = std::fs::read_to_string(data.path().join("api-keys")).unwrap();
    assert!(
        stored.contains(&format!("generated={hashed}")),
        "{stored} vs {hashed}"
    );
}

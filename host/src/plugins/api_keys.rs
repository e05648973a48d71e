//! The key list handed to the auth plugin (`api_keys` in its config, `name=<sha256 hex>` entries):
//! the operator's hashed keys, the plain keys of `WANSERVE_API_KEYS` (hashed here, never stored
//! or logged), and the key file in the data directory. With no key and no JWT configured the
//! server would be closed to everyone or, worse, tempt an operator to open it: so a key is
//! generated, only its hash is stored, and the key itself is returned to be printed once.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The key file, in the data directory: `name=<sha256 hex>` per line.
/// Why the API keys cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("API keys in {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{var}: {reason}")]
    Env { var: String, reason: String },
}

pub const KEY_FILE: &str = "api-keys";
/// Prefix of generated keys, so a leaked one is recognisable in a secret scanner.
pub const GENERATED_PREFIX: &str = "wsk_";

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Completes `auth_config["api_keys"]` from the environment's keys and the key file, generating
/// a key when there is none at all and `generate` allows. Returns the generated key (to print
/// once), if any.
pub fn seed_api_keys(
    auth_config: &mut BTreeMap<String, String>,
    env_keys: Option<&str>,
    data_dir: &Path,
    generate: bool,
) -> Result<Option<String>, KeysError> {
    let path = data_dir.join(KEY_FILE);
    let keys_error = |reason: String| KeysError::File {
        path: path.clone(),
        reason,
    };
    let mut entries: Vec<String> = auth_config
        .get("api_keys")
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    for (i, entry) in env_keys
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .enumerate()
    {
        let env_error = |reason: String| KeysError::Env {
            var: "WANSERVE_API_KEYS".into(),
            reason: format!("entry {}: {reason}", i + 1),
        };
        if entry.chars().any(char::is_whitespace) {
            return Err(env_error("contains whitespace".into()));
        }
        let (name, key) = named_key(entry);
        entries.push(format!("{name}={}", hash_key(key)));
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => entries.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(keys_error(e.to_string())),
    }
    let mut generated = None;
    if generate && entries.is_empty() && !auth_config.contains_key(super::jwt::ALGORITHM) {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| keys_error(format!("no randomness: {e}")))?;
        let key = format!("{GENERATED_PREFIX}{}", hex::encode(secret));
        let entry = format!("generated={}", hash_key(&key));
        write_key_file(&path, &entry).map_err(|e| keys_error(e.to_string()))?;
        tracing::warn!(file = %path.display(), "no API key configured: generated one (printed once on stdout; only its hash is stored)");
        entries.push(entry);
        generated = Some(key);
    }
    auth_config.insert("api_keys".into(), entries.join(","));
    Ok(generated)
}

/// A `WANSERVE_API_KEYS` entry as (principal name, key): `name=key`, or a bare key, named by a
/// digest of itself. Either way the name is the same wherever the key is listed, in whatever
/// order (it used to be the key's position, so removing one key handed the next one its jobs).
/// A bare key whose `=`s are only trailing base64 padding stays a bare key.
fn named_key(entry: &str) -> (String, &str) {
    if let Some((name, key)) = entry.split_once('=')
        && is_principal_name(name)
        && !key.chars().all(|c| c == '=')
    {
        return (name.to_string(), key);
    }
    (derived_name(entry), entry)
}

/// `key-` and 16 hex digits of a digest that is not the stored hash (nothing learnt from one
/// helps with the other), stable across hosts and restarts.
pub fn derived_name(key: &str) -> String {
    let digest = Sha256::digest(format!("wanserve-principal:{key}").as_bytes());
    format!("key-{}", &hex::encode(digest)[..16])
}

/// Names an operator may give a key: what the key file and the plugin's list can carry.
fn is_principal_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Writes the key file whole or not at all, readable by the owner only.
fn write_key_file(path: &Path, entry: &str) -> std::io::Result<()> {
    let text = format!(
        "# wanserve API keys, read at start-up: name=<sha256 of the key> per line.\n{entry}\n"
    );
    crate::private_file::write_private_file(path, text.as_bytes())
}

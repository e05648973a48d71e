//! `wanserve plugin new`: a standalone plugin crate that builds with `cargo build --release`
//! anywhere. Its sources are this repository's templates (`plugins/template*`, built and
//! checked by CI like every plugin), with the WIT package and the allocator vendored beside
//! them and the build settings the workspace would otherwise give: its own `[workspace]`,
//! release profile and `.cargo/config.toml`.

use super::slot::{Slot, WIT_PACKAGE};
use std::path::{Path, PathBuf};

const WIT: &str = include_str!("../../../wit/policy.wit");
const GUEST_ALLOC: &str = include_str!("../../../plugins/guest-alloc/src/lib.rs");
const POLICY_LIB: &str = include_str!("../../../plugins/wanserve-policy/src/lib.rs");
/// The guest library's modules besides lib.rs (the default rules of each slot).
const POLICY_MODULES: [(&str, &str); 3] = [
    (
        "seed.rs",
        include_str!("../../../plugins/wanserve-policy/src/seed.rs"),
    ),
    (
        "auth.rs",
        include_str!("../../../plugins/wanserve-policy/src/auth.rs"),
    ),
    (
        "retention.rs",
        include_str!("../../../plugins/wanserve-policy/src/retention.rs"),
    ),
];
const AUTH: &str = include_str!("../../../plugins/template/src/lib.rs");
const VALIDATE: &str = include_str!("../../../plugins/template-validate/src/lib.rs");
const POSTPROCESS: &str = include_str!("../../../plugins/template-postprocess/src/lib.rs");
/// The wit-bindgen the templates are built with in this repository (plugins/Cargo.toml).
const WIT_BINDGEN: &str = "0.46";
const TALC: &str = "5.1";

#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    #[error("{0:?} is not a crate name: 1 to 64 of a-z, 0-9, - and _, starting with a letter")]
    BadName(String),
    #[error("{0} already exists and is not empty: pick another directory")]
    NotEmpty(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ScaffoldError::BadName(name.to_string()))
    }
}

/// The files of a new plugin crate `name` for `slot`, as (path in the crate, contents).
pub fn files(name: &str, slot: Slot) -> Result<Vec<(PathBuf, String)>, ScaffoldError> {
    check_name(name)?;
    let template = match slot {
        Slot::Auth => AUTH,
        Slot::Validate => VALIDATE,
        Slot::Postprocess => POSTPROCESS,
    };
    // The templates sit two levels below the repository's wit/; here it is beside Cargo.toml.
    let lib = template.replace("path: \"../../wit\"", "path: \"wit\"");
    let artifact = name.replace('-', "_");
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
wit-bindgen = {{ version = "{WIT_BINDGEN}", default-features = false, features = ["macros", "realloc"] }}
guest-alloc = {{ path = "guest-alloc" }}
# The default rules as functions, vendored beside it.
wanserve-policy = {{ path = "wanserve-policy" }}

# Its own workspace: it builds the same inside another project's tree.
[workspace]

# Speed over size: a plugin runs on every request.
[profile.release]
opt-level = 3
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#
    );
    let config = r#"# wasm32-unknown-unknown: std imports nothing there, so the component imports only the
# policy host. wasm-component-ld (shipped with rustup) links the module into a component.
[build]
target = "wasm32-unknown-unknown"

[target.wasm32-unknown-unknown]
linker = "wasm-component-ld"
"#;
    let alloc_cargo = format!(
        r#"[package]
name = "guest-alloc"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
talc = {{ version = "{TALC}", default-features = false }}
"#
    );
    let readme = format!(
        r#"# {name}

A `{slot}` plugin for wanserve (WIT package `{WIT_PACKAGE}`, vendored in `wit/`), made by
`wanserve plugin new {name} --slot {slot}`. Its code is `src/lib.rs`; `guest-alloc/` is the
allocator wanserve's own plugins use (a heap in the initial memory: no `memory.grow` per call);
`wanserve-policy/` is the default plugins' rules as functions, to build on: `seed::validate`
(the default validate plugin), `auth::authenticate` and its parts (the default auth plugin),
`retention` (the default postprocess plugin).

Needs Rust with the wasm32-unknown-unknown target (`rustup target add wasm32-unknown-unknown`;
the `wasm-component-ld` linker comes with rustup).

1. Build:

       cargo build --release

   The component is `target/wasm32-unknown-unknown/release/{artifact}.wasm`.

2. Check it fits the slot and passes its self-test (nothing is installed):

       wanserve plugin check --slot {slot} target/wasm32-unknown-unknown/release/{artifact}.wasm

3. Deploy it into a running server, through the admin API (it serves after the same checks;
   the server keeps it across restarts, and `POST /admin/plugins/{slot}/rollback` undoes it):

       curl -X PUT -H "Authorization: Bearer $WANSERVE_ADMIN_KEY" \
            --data-binary @target/wasm32-unknown-unknown/release/{artifact}.wasm \
            http://localhost:8088/admin/plugins/{slot}

   or copy it into the server's plugin directory as `{file}` (the server watches it).
"#,
        file = slot.default_file(),
    );
    let policy_cargo = format!(
        r#"[package]
name = "wanserve-policy"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
wit-bindgen = {{ version = "{WIT_BINDGEN}", default-features = false, features = ["macros", "realloc"] }}
"#
    );
    let mut files = vec![
        (PathBuf::from("Cargo.toml"), cargo),
        (PathBuf::from(".cargo/config.toml"), config.to_string()),
        (PathBuf::from("src/lib.rs"), lib),
        (PathBuf::from("wit/policy.wit"), WIT.to_string()),
        (PathBuf::from("guest-alloc/Cargo.toml"), alloc_cargo),
        (
            PathBuf::from("guest-alloc/src/lib.rs"),
            GUEST_ALLOC.to_string(),
        ),
        (PathBuf::from("README.md"), readme),
    ];
    files.extend([
        (PathBuf::from("wanserve-policy/Cargo.toml"), policy_cargo),
        (
            PathBuf::from("wanserve-policy/src/lib.rs"),
            POLICY_LIB.replace("path: \"../../wit\"", "path: \"../wit\""),
        ),
    ]);
    files.extend(POLICY_MODULES.iter().map(|(file, text)| {
        (
            PathBuf::from("wanserve-policy/src").join(file),
            text.to_string(),
        )
    }));
    Ok(files)
}

/// Writes the crate into `dir` (made if missing; refused if it holds anything).
pub fn write(dir: &Path, name: &str, slot: Slot) -> Result<Vec<PathBuf>, ScaffoldError> {
    let files = files(name, slot)?;
    if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(ScaffoldError::NotEmpty(dir.to_path_buf()));
    }
    let mut written = Vec::new();
    for (relative, contents) in files {
        let path = dir.join(&relative);
        let failed = |source| ScaffoldError::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        std::fs::write(&path, contents).map_err(failed)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_every_slot_gets_a_crate_that_points_at_its_own_wit() {
        for bad in ["", "Upper", "1st", "has space", "dots.in", &"x".repeat(65)] {
            assert!(files(bad, Slot::Auth).is_err(), "{bad:?}");
        }
        for slot in Slot::ALL {
            let files = files("my-plugin", slot).expect("files");
            let lib = &files
                .iter()
                .find(|(p, _)| p.ends_with("src/lib.rs"))
                .expect("lib")
                .1;
            assert!(lib.contains("path: \"wit\""), "{slot}");
            assert!(
                lib.contains(&format!("world: \"{}\"", slot.world())),
                "{slot}"
            );
            assert!(
                !lib.contains("path: \"../"),
                "{slot}: a WIT path out of the crate"
            );
            let readme = &files
                .iter()
                .find(|(p, _)| p.ends_with("README.md"))
                .expect("readme")
                .1;
            assert!(
                readme.contains("my_plugin.wasm") && readme.contains(&format!("--slot {slot}"))
            );
        }
    }
}

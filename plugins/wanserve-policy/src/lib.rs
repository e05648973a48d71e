//! Building blocks for wanserve policy plugins.
//!
//! - [`types`] and [`host`]: the `wanserve:policy` types and host imports, generated once here.
//!   A plugin reuses them in its own bindings, so that what this library returns is what its
//!   exports return:
//!
//!   ```ignore
//!   wit_bindgen::generate!({ path: "wit", world: "validate-plugin", with: {
//!       "wanserve:policy/types": wanserve_policy::types,
//!       "wanserve:policy/host": wanserve_policy::host,
//!   }});
//!   ```
//! - [`seed`]: the seed's validation rules, the ones the default validate plugin applies, as a
//!   function: a custom validator is `seed::validate(&body)`, then its own rules.
//! - [`auth`]: the default auth plugin's rules (Bearer API keys hashed and compared in constant
//!   time, JWTs verified by the host, public paths, reuse): `auth::authenticate` is that whole
//!   plugin; its parts (`bearer_token`, `api_key_principal`, …) serve a plugin with rules of its
//!   own.
//! - [`retention`]: the default postprocess plugin's rules (object key, metadata, retention per
//!   tier, the sweeper's answer).

mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        inline: "package wanserve:guest; world guest { import wanserve:policy/types@0.1.0; import wanserve:policy/host@0.1.0; }",
        world: "wanserve:guest/guest",
        generate_all,
    });
}

pub use bindings::wanserve::policy::{host, types};

pub mod auth;
pub mod retention;
pub mod seed;

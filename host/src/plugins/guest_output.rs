//! Bounds on what a plugin may hand back.

use super::bindings::{FieldError, GenerationRequest, OutputPolicy, Principal};

/// Bounds on what a plugin may hand back: a component's answer is copied out of its memory
/// before the host can look at it, so these keep one bad plugin from flooding logs, responses
/// and the job store.
pub(super) const MAX_TEXT: usize = 4096;
pub(super) const MAX_PROMPT: usize = 64 << 10;
pub(super) const MAX_ENTRIES: usize = 256;

pub(super) fn check_text(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("{what} is {} bytes (at most {max})", text.len()));
    }
    Ok(())
}

pub(super) fn check_pairs(what: &str, pairs: &[(String, String)]) -> Result<(), String> {
    if pairs.len() > MAX_ENTRIES {
        return Err(format!("{} {what} (at most {MAX_ENTRIES})", pairs.len()));
    }
    pairs.iter().try_for_each(|(k, v)| {
        check_text(what, k, MAX_TEXT)?;
        check_text(what, v, MAX_TEXT)
    })
}

pub(super) fn check_principal(principal: &Principal) -> Result<(), String> {
    if principal.id.is_empty() {
        return Err("the principal has no id".into());
    }
    check_text("principal id", &principal.id, MAX_TEXT)?;
    check_text("display name", &principal.display_name, MAX_TEXT)?;
    check_pairs("attributes", &principal.attributes)
}

pub(super) fn check_request(request: &GenerationRequest) -> Result<(), String> {
    check_text("model", &request.model, MAX_TEXT)?;
    check_text("prompt", &request.prompt, MAX_PROMPT)?;
    check_text("negative prompt", &request.negative_prompt, MAX_PROMPT)
}

pub(super) fn check_field_errors(errors: &[FieldError]) -> Result<(), String> {
    if errors.is_empty() {
        return Err("a refusal without any field error".into());
    }
    if errors.len() > MAX_ENTRIES {
        return Err(format!(
            "{} field errors (at most {MAX_ENTRIES})",
            errors.len()
        ));
    }
    errors.iter().try_for_each(|e| {
        check_text("field name", &e.field, MAX_TEXT)?;
        check_text("reason", &e.reason, MAX_TEXT)
    })
}

pub(super) fn check_output_policy(policy: &OutputPolicy) -> Result<(), String> {
    check_object_key(&policy.object_key)?;
    check_pairs("metadata", &policy.metadata)
}

/// Object keys stay inside the store (see [`crate::storage::is_safe_key`]).
pub(super) fn check_object_key(key: &str) -> Result<(), String> {
    if crate::storage::is_safe_key(key) {
        Ok(())
    } else {
        Err(format!(
            "object key {key:?} is not a safe relative path of at most 512 bytes"
        ))
    }
}

/// The innermost message of an error chain: what went wrong, without the wrapping context.
pub(super) fn root_cause(e: &wasmtime::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    // On one line (a trap's message carries a multi-line wasm backtrace), all of it: the trap's
    // kind comes last.
    crate::error_chain::one_line(&chain.join(": "), usize::MAX)
}

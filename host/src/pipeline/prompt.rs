//! Prompt cleaning and tokenization as diffusers' `WanPipeline` does them.
//!
//! diffusers' `prompt_clean` runs `ftfy.fix_text` *only when ftfy is installed* (it is not a
//! dependency of diffusers), then `html.unescape` twice, then collapses `\s+` to one space and
//! strips. wanserve does the last three and never ftfy, which is what diffusers does without it.
//! Known differences, all on malformed input: Python's `html.unescape` also decodes a few legacy
//! entities written without `;` inside words and maps invalid numeric references (`&#128;`) the
//! way browsers do; Python's `\s` also matches the ASCII separators U+001C–U+001F.

use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("cannot tokenize the prompt: {0}")]
    Encode(String),
}

pub fn clean_prompt(text: &str) -> String {
    let once = html_escape::decode_html_entities(text);
    let twice = html_escape::decode_html_entities(&once);
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Token ids and attention mask of one prompt, padded to the text encoder's length.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPrompt {
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    /// Number of real (non-padding) tokens, `</s>` included.
    pub len: usize,
}

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
}

impl PromptTokenizer {
    pub fn load(path: &Path, max_length: usize, pad_id: u32) -> Result<Self, PromptError> {
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| PromptError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let pad_token = tokenizer
            .id_to_token(pad_id)
            .unwrap_or_else(|| "<pad>".to_string());
        // padding="max_length", truncation=True, as diffusers calls the tokenizer.
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| PromptError::Load {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token,
            ..Default::default()
        }));
        Ok(Self { tokenizer })
    }

    /// Cleans and tokenizes one prompt (with `</s>` appended).
    pub fn encode(&self, prompt: &str) -> Result<TokenizedPrompt, PromptError> {
        let cleaned = clean_prompt(prompt);
        let encoding = self
            .tokenizer
            .encode(cleaned, true)
            .map_err(|e| PromptError::Encode(e.to_string()))?;
        let input_ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        let attention_mask: Vec<i64> = encoding
            .get_attention_mask()
            .iter()
            .map(|&m| i64::from(m))
            .collect();
        let len = attention_mask.iter().filter(|&&m| m > 0).count();
        Ok(TokenizedPrompt {
            input_ids,
            attention_mask,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::clean_prompt;

    #[test]
    fn cleaning_unescapes_twice_and_collapses_whitespace() {
        assert_eq!(clean_prompt("  a\t\tcat \n on  a mat "), "a cat on a mat");
        assert_eq!(clean_prompt("fish &amp;amp; chips"), "fish & chips");
        assert_eq!(clean_prompt("&lt;b&gt;bold&lt;/b&gt;"), "<b>bold</b>");
        assert_eq!(clean_prompt("雪　山"), "雪 山"); // U+3000 ideographic space is whitespace
        assert_eq!(clean_prompt("🌅 sunrise"), "🌅 sunrise");
    }
}

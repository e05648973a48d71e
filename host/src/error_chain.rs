//! An error with its causes on one line, for logs and for errors that name a failed request.

/// `error: cause: cause…`. reqwest's own message is "error sending request"; the cause
/// (refused, DNS, TLS) is below it.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// A message as one readable line: whitespace runs (a wrapped error's newlines, a wasm
/// backtrace's layout, a debug dump's) collapsed to one space, at most `max_chars` characters
/// (then `…`). For log lines that shippers split on newlines, and for reasons shown to
/// operators.
pub fn one_line(message: &str, max_chars: usize) -> String {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(max_chars) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_collapses_layout_and_bounds_length() {
        assert_eq!(
            super::one_line("trap:\n  0: at f\n\t1: at g", 300),
            "trap: 0: at f 1: at g"
        );
        let long = super::one_line(&"é".repeat(400), 300);
        assert_eq!(long.chars().count(), 301, "300 and the ellipsis");
        assert!(long.ends_with('…'));
    }
}

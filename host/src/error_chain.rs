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

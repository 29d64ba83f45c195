//! Logging set-up. In Lambda: JSON or text as `AWS_LAMBDA_LOG_FORMAT` says, level from
//! `AWS_LAMBDA_LOG_LEVEL`/`RUST_LOG`, request id from the runtime's span. Locally:
//! human-readable lines, level from `RUST_LOG` (default info).

/// For Lambda functions.
pub fn init_lambda() {
    lambda_http::tracing::init_default_subscriber();
}

/// For the local runner and tools.
pub fn init_local() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log redirected to a file stays plain text.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(terminal)
        .try_init();
}

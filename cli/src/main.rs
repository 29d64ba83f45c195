//! `tally-admin`: lookups, exports and reconciliation for support staff and finance.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = tally_admin::Cli::parse();
    let mut out = std::io::stdout().lock();
    match tally_admin::run(cli, &mut out).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally-admin: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

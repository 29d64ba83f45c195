//! `make run`: the whole system on one port with a persistent embedded store.

use tally_local::{Settings, app, demo_tokens, ledger, seed_demo};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally::telemetry::init_local();
    let settings = Settings::from_env()?;
    let ledger = ledger(&settings.data_dir)?;
    seed_demo(&ledger).await?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], settings.port));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e} (set PORT to use another port)")
    })?;
    let tokens = demo_tokens(&settings.dev_secret, chrono::Utc::now());
    println!(
        "\nTally is running at http://{addr}  (data in {})\n\n\
         Demo workspace \"demo\" (Max plan, 400 credits). Tokens, valid 30 days:\n\
         export OWNER={}\n\
         export MEMBER={}\n\
         export GENSVC={}\n\
         export SUPPORT={}\n\n\
         Try:\n\
         curl -s http://{addr}/v1/balance -H \"Authorization: Bearer $OWNER\"\n\
         curl -s http://{addr}/v1/generations -H \"Authorization: Bearer $OWNER\" -H 'Content-Type: application/json' \\\n  \
         -d '{{\"workflow\":\"video\",\"model\":\"video-pro\",\"duration_s\":10,\"resolution\":\"2k\"}}'\n\
         API reference: http://{addr}/openapi.json\n",
        settings.data_dir.display(),
        tokens.owner,
        tokens.member,
        tokens.generation_service,
        tokens.support,
    );
    axum::serve(listener, app(ledger, &settings.dev_secret))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

//! `make run`: the whole system on one port with a persistent embedded store.

use tally_local::{LocalConfig, Settings, build, demo_tokens, seed_demo, stores};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tally::telemetry::init_local();
    let settings = Settings::from_env()?;
    let tally_local::Stores {
        ledger,
        docs,
        clock,
        embedded,
    } = stores(&settings.data_dir, settings.catalog_path.as_deref())?;
    seed_demo(&ledger).await?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], settings.port));
    let simulated = settings.stripe_secret_key.is_none();
    let local = build(LocalConfig {
        ledger,
        clock,
        docs,
        dev_secret: settings.dev_secret.clone(),
        webhook_secrets: settings.webhook_secrets.clone(),
        base_url: format!("http://{addr}"),
        stripe_secret_key: settings.stripe_secret_key.clone(),
        return_urls: settings.return_urls.clone(),
        helpdesk_url: settings.helpdesk_url.clone(),
        helpdesk_secret: settings.helpdesk_secret.clone(),
        queue_journal: Some(embedded),
        export_limit: Some(credits_api::LAMBDA_EXPORT_LIMIT),
    })?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e} (set PORT to use another port)")
    })?;
    let tokens = demo_tokens(&settings.dev_secret, chrono::Utc::now());
    println!(
        "\nTally is running at http://{addr}  (data in {})\n\n\
         Demo workspace \"demo\" (Max plan, 400 credits when first made). Tokens, valid 30 days:\n\
         export OWNER={}\n\
         export STUDIO={}   # owner of \"studio\", a workspace with no plan yet\n\
         export MEMBER={}\n\
         export GENSVC={}\n\
         export SUPPORT={}\n\n\
         Try:\n\
         curl -s http://{addr}/v1/balance -H \"Authorization: Bearer $OWNER\"\n\
         curl -s http://{addr}/v1/generations -H \"Authorization: Bearer $OWNER\" -H 'Content-Type: application/json' \\\n  \
         -d '{{\"workflow\":\"video\",\"model\":\"video-pro\",\"duration_s\":10,\"resolution\":\"2k\"}}'\n\
         Buy 500 credits (then open the returned url and press Pay{}):\n\
         curl -s http://{addr}/v1/checkout/sessions -H \"Authorization: Bearer $OWNER\" -H 'Content-Type: application/json' \\\n  \
         -d '{{\"kind\":\"pack\",\"pack\":\"pack_500\"}}'\n\
         Open a support ticket (forwarded tickets show at /dev/outbox):\n\
         curl -s http://{addr}/v1/support/tickets -H \"Authorization: Bearer $OWNER\" -H 'Content-Type: application/json' \\\n  \
         -d '{{\"category\":\"credits\",\"subject\":\"Balance seems low\",\"message\":\"Is someone else generating?\"}}'\n\
         API reference: http://{addr}/openapi.json\n",
        settings.data_dir.display(),
        tokens.owner,
        tokens.studio_owner,
        tokens.member,
        tokens.generation_service,
        tokens.support,
        if simulated {
            "; payments are simulated, see /sim/events;\n\
             move the clock with POST /sim/clock/advance {\"days\":30}"
        } else {
            ""
        },
    );
    axum::serve(listener, local.router.clone())
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

//! The help desk's webhook as a [`Sink`]: a signed JSON POST over HTTPS (or HTTP for a
//! local help desk). A 2xx answer is a delivery; anything else, or no answer within
//! [`TIMEOUT`], is a failure the forwarder tries again.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tally::support::forward::{DeliveryError, SIGNATURE_HEADER, Signed, Sink};

/// How long one delivery may take.
pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct WebhookSink {
    url: http::Uri,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl WebhookSink {
    pub fn new(url: &str) -> Result<Self, DeliveryError> {
        let url: http::Uri = url.parse().map_err(|e| DeliveryError(Box::new(e)))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            url,
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }
}

#[async_trait::async_trait]
impl Sink for WebhookSink {
    async fn deliver(&self, d: &Signed) -> Result<(), DeliveryError> {
        let req = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, "tally-support-forwarder/1")
            .header(SIGNATURE_HEADER, &d.signature)
            .header("Idempotency-Key", &d.id)
            .body(Full::new(Bytes::from(d.body.clone())))
            .map_err(|e| DeliveryError(Box::new(e)))?;
        let res = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| DeliveryError("the help desk did not answer in time".into()))?
            .map_err(|e| DeliveryError(Box::new(e)))?;
        let status = res.status();
        // Read (and drop) the body so the connection can be reused.
        let _ = res.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(DeliveryError(
                format!("the help desk answered {status}").into(),
            ))
        }
    }
}

//! The Stripe client billing-sync uses, and the start-up check that Stripe answers.
//!
//! In: the `[stripe]` section and the secret key. Out: an async-stripe client pointed at the
//! configured base URL (stripe-mock locally), or one line naming the URL that failed.

use crate::settings::StripeSettings;

#[derive(Debug, thiserror::Error)]
pub enum StripeCheckError {
    #[error("{env} is not set: billing-sync needs a Stripe secret key", env = crate::settings::STRIPE_KEY_ENV)]
    MissingKey,
    #[error("stripe at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// Builds a client for `settings.api_base`. The key is never logged or echoed.
pub fn client(settings: &StripeSettings, api_key: &str) -> Result<stripe::Client, StripeCheckError> {
    if api_key.is_empty() {
        return Err(StripeCheckError::MissingKey);
    }
    stripe::ClientBuilder::new(api_key)
        .url(settings.api_base.clone())
        .build()
        .map_err(|e| StripeCheckError::Unreachable {
            url: settings.api_base.clone(),
            reason: e.to_string(),
        })
}

/// Lists one billing meter: proves the URL answers and the key is accepted.
pub async fn check_reachable(settings: &StripeSettings, client: &stripe::Client) -> Result<(), StripeCheckError> {
    stripe_billing::billing_meter::ListBillingMeter::new()
        .limit(1)
        .send(client)
        .await
        .map(|_| ())
        .map_err(|e| StripeCheckError::Unreachable {
            url: settings.api_base.clone(),
            reason: e.to_string(),
        })
}

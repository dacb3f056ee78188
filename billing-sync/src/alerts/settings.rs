//! `[alerts]`: where alerts go, when they fire, how delivery is retried; and the webhook
//! secret, read from the environment or a file, never from the settings.
//!
//! In: the `[alerts]` table, `TOLLGATE_ALERTS_WEBHOOK_SECRET` or the file
//! `webhook_secret_file` names. Out: validated [`AlertsSettings`] and a [`WebhookSecret`]
//! whose `Debug` never shows the key.

use std::path::PathBuf;

use base64::Engine as _;
use serde::Deserialize;
use tollgate_runtime::settings::{http_url, in_range, Invalid};

/// Where the webhook secret comes from when `webhook_secret_file` is not set.
pub const SECRET_ENV: &str = "TOLLGATE_ALERTS_WEBHOOK_SECRET";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsSettings {
    /// The operator's endpoint every alert is POSTed to (`http://` or `https://`).
    pub webhook_url: String,
    /// A file holding the secret (`whsec_<base64>`); without it the secret comes from
    /// `TOLLGATE_ALERTS_WEBHOOK_SECRET`. A relative path is read from the settings file's
    /// directory.
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
    /// Percentages of a calendar `day` / `month` quota that raise an alert, ascending.
    #[serde(default = "default_quota_thresholds")]
    pub quota_thresholds: Vec<u32>,
    /// How often spend and quotas are compared with their thresholds, and pending
    /// deliveries re-sent.
    #[serde(default = "default_check_interval_secs")]
    pub check_interval_secs: u64,
    /// One delivery attempt's deadline.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Attempts per alert within one check; an alert still undelivered stays pending and is
    /// re-sent, with the same `webhook-id`, at the next check, until a 2xx.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_quota_thresholds() -> Vec<u32> {
    vec![80, 100]
}
fn default_check_interval_secs() -> u64 {
    60
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff_ms() -> u64 {
    500
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

impl AlertsSettings {
    /// Checks every field; `section` is the table's dotted path (`alerts`).
    pub fn validate(&self, section: &str) -> Result<(), Invalid> {
        let field = |name: &str| format!("{section}.{name}");
        http_url(&field("webhook_url"), &self.webhook_url)?;
        let thresholds = &self.quota_thresholds;
        if thresholds.is_empty()
            || thresholds.iter().any(|t| !(1..=100).contains(t))
            || thresholds.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(Invalid::new(
                field("quota_thresholds"),
                format!("{thresholds:?}"),
                "ascending percentages from 1 to 100, at least one",
            ));
        }
        in_range(&field("check_interval_secs"), self.check_interval_secs, 1, 86_400)?;
        in_range(&field("timeout_ms"), self.timeout_ms, 100, 120_000)?;
        in_range(&field("max_attempts"), u64::from(self.max_attempts), 1, 100)?;
        in_range(&field("initial_backoff_ms"), self.initial_backoff_ms, 1, 60_000)?;
        in_range(
            &field("max_backoff_ms"),
            self.max_backoff_ms,
            self.initial_backoff_ms,
            600_000,
        )?;
        Ok(())
    }

    /// The secret from `webhook_secret_file` or, without one, from `TOLLGATE_ALERTS_WEBHOOK_SECRET`.
    pub fn secret(&self) -> Result<WebhookSecret, SecretError> {
        let text = match &self.webhook_secret_file {
            Some(path) => std::fs::read_to_string(path).map_err(|e| SecretError::Read {
                path: path.display().to_string(),
                error: e.to_string(),
            })?,
            None => std::env::var(SECRET_ENV).map_err(|_| SecretError::Missing)?,
        };
        WebhookSecret::parse(text.trim())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("alerts: no webhook secret: set {SECRET_ENV} or alerts.webhook_secret_file")]
    Missing,
    #[error("alerts.webhook_secret_file {path}: cannot read: {error}")]
    Read { path: String, error: String },
    // Never the value: the message says what is wrong with it only.
    #[error("alerts: the webhook secret is not whsec_ followed by the base64 of 24 to 64 bytes ({reason})")]
    Malformed { reason: &'static str },
}

/// The HMAC key of the webhook signatures: the bytes behind `whsec_<base64>`, the form
/// Standard Webhooks gives secrets in (<https://www.standardwebhooks.com/>).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl WebhookSecret {
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text.strip_prefix("whsec_").ok_or(SecretError::Malformed {
            reason: "no whsec_ prefix",
        })?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::Malformed { reason: "not base64" })?;
        // The specification's bounds on the key: long enough to resist guessing.
        if !(24..=64).contains(&key.len()) {
            return Err(SecretError::Malformed { reason: "wrong length" });
        }
        Ok(Self(key))
    }

    pub fn key(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(edit: impl FnOnce(&mut AlertsSettings)) -> AlertsSettings {
        let mut s: AlertsSettings =
            toml::from_str("webhook_url = \"http://127.0.0.1:9200/alerts\"").expect("minimal alerts settings");
        edit(&mut s);
        s
    }

    #[test]
    fn defaults_are_valid() {
        let s = settings(|_| {});
        s.validate("alerts").unwrap();
        assert_eq!(s.quota_thresholds, vec![80, 100]);
    }

    #[test]
    fn bad_settings_name_the_field_and_value() {
        type Edit = Box<dyn FnOnce(&mut AlertsSettings)>;
        let cases: Vec<(Edit, &str, &str)> = vec![
            (
                Box::new(|s| s.webhook_url = "ftp://x".into()),
                "alerts.webhook_url",
                "ftp://x",
            ),
            (
                Box::new(|s| s.quota_thresholds = vec![100, 80]),
                "alerts.quota_thresholds",
                "[100, 80]",
            ),
            (
                Box::new(|s| s.quota_thresholds = vec![0]),
                "alerts.quota_thresholds",
                "[0]",
            ),
            (
                Box::new(|s| s.quota_thresholds = vec![]),
                "alerts.quota_thresholds",
                "[]",
            ),
            (
                Box::new(|s| s.check_interval_secs = 0),
                "alerts.check_interval_secs",
                "0",
            ),
            (Box::new(|s| s.max_attempts = 0), "alerts.max_attempts", "0"),
            (Box::new(|s| s.max_backoff_ms = 1), "alerts.max_backoff_ms", "1"),
        ];
        for (edit, field, found) in cases {
            let err = settings(edit).validate("alerts").unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().contains(found), "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = toml::from_str::<AlertsSettings>("webhook_url = \"http://x/\"\nthreshold = [1]").unwrap_err();
        assert!(err.to_string().contains("unknown field `threshold`"), "{err}");
    }

    #[test]
    fn secrets_parse_only_in_the_whsec_form_and_never_show() {
        let good = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode([7u8; 32]));
        let secret = WebhookSecret::parse(&good).unwrap();
        assert_eq!(secret.key(), &[7u8; 32]);
        assert!(!format!("{secret:?}").contains(&good[6..]));
        for (bad, reason) in [
            ("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "no whsec_ prefix"),
            ("whsec_!!!", "not base64"),
            ("whsec_c2hvcnQ=", "wrong length"),
        ] {
            let err = WebhookSecret::parse(bad).unwrap_err();
            assert_eq!(err, SecretError::Malformed { reason });
            assert!(!err.to_string().contains(bad), "{err}");
        }
    }
}

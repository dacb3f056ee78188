//! ClickHouse connection settings shared by meter-consumer and billing-sync.
//!
//! In: the `[clickhouse]` section and `TOLLGATE_CLICKHOUSE_PASSWORD`. Out: a `clickhouse`
//! client set up for both Debian's 18.16 and current servers, and a ping that names the URL
//! when the server cannot be reached.

use serde::Deserialize;

use crate::settings::{http_url, Invalid};

/// Where the ClickHouse password comes from: never the settings file.
pub const PASSWORD_ENV: &str = "TOLLGATE_CLICKHOUSE_PASSWORD";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickhouseSettings {
    /// HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub url: String,
    /// Database holding Tollgate's tables; created if missing.
    #[serde(default = "default_database")]
    pub database: String,
    /// User name; the password comes from `TOLLGATE_CLICKHOUSE_PASSWORD`.
    #[serde(default = "default_user")]
    pub user: String,
}

fn default_database() -> String {
    "tollgate".to_owned()
}

fn default_user() -> String {
    "default".to_owned()
}

impl ClickhouseSettings {
    pub fn validate(&self, section: &str) -> Result<(), Invalid> {
        http_url(&format!("{section}.url"), &self.url)?;
        let valid_name = !self.database.is_empty()
            && self.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !self.database.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(Invalid::new(
                format!("{section}.database"),
                &self.database,
                "a name of letters, digits and `_`, not starting with a digit",
            ));
        }
        Ok(())
    }

    /// A client without a default database (for `CREATE DATABASE`).
    pub fn server_client(&self) -> clickhouse::Client {
        let mut client = clickhouse::Client::default()
            .with_url(&self.url)
            .with_user(&self.user)
            // 18.16 knows neither `describe_include_subcolumns` nor RowBinaryWithNamesAndTypes,
            // which the crate's schema validation uses.
            .with_validation(false);
        if let Ok(password) = std::env::var(PASSWORD_ENV) {
            client = client.with_password(password);
        }
        client
    }

    /// A client whose queries run in the Tollgate database.
    pub fn client(&self) -> clickhouse::Client {
        self.server_client().with_database(&self.database)
    }

    /// Checks the server answers and creates the database if missing.
    pub async fn connect(&self) -> Result<clickhouse::Client, ClickhouseCheckError> {
        let server = self.server_client();
        // Either nothing answers, or the server answers and refuses (a wrong password, a
        // user without the grant): the operator fixes different things.
        let unreachable = |e: clickhouse::error::Error| match e {
            clickhouse::error::Error::Network(_) | clickhouse::error::Error::TimedOut => {
                ClickhouseCheckError::Unreachable {
                    url: self.url.clone(),
                    reason: e.to_string(),
                }
            }
            _ => ClickhouseCheckError::Refused {
                url: self.url.clone(),
                user: self.user.clone(),
                reason: e.to_string(),
            },
        };
        server.query("SELECT 1").fetch_one::<u8>().await.map_err(unreachable)?;
        server
            .query(&format!("CREATE DATABASE IF NOT EXISTS {}", self.database))
            .execute()
            .await
            .map_err(unreachable)?;
        Ok(self.client())
    }
}

/// Why the start-up check failed; the password is never part of it (ClickHouse's own
/// answer names only the user).
#[derive(Debug, thiserror::Error)]
pub enum ClickhouseCheckError {
    #[error("clickhouse at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("clickhouse at {url} refused user `{user}`: {reason}")]
    Refused { url: String, user: String, reason: String },
}

//! The portal's settings: `config/portal.toml`, overlaid by `TOLLGATE_<SECTION>__<FIELD>`.
//!
//! In: the TOML file and the environment; the admin token from `TOLLGATE_ADMIN_TOKEN` (never
//! the file). Out: validated [`PortalSettings`], or one line naming the field.

use std::path::PathBuf;

use serde::Deserialize;
use tollgate_runtime::clickhouse::ClickhouseSettings;
use tollgate_runtime::settings::{http_url, in_range, socket_addr, Invalid, Validate};

/// Where the gateway's admin token comes from: the portal acts on the admin API with it.
pub const ADMIN_TOKEN_ENV: &str = "TOLLGATE_ADMIN_TOKEN";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalSettings {
    pub portal: PortalSection,
    pub gateway: GatewaySection,
    /// The meter-consumer's database, read for usage (rollups only, never raw events).
    pub clickhouse: ClickhouseSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalSection {
    /// Listener address, e.g. `127.0.0.1:8082`.
    pub listen: String,
    /// The base URL browsers reach the portal at; `https://` makes the session cookie `Secure`.
    pub url: String,
    /// How long a session lasts after its link was opened, in seconds.
    #[serde(default = "default_session_ttl_secs")]
    pub session_ttl_secs: u64,
    /// The longest grace period a tenant may give a rolled key, in seconds.
    #[serde(default = "default_max_roll_grace_secs")]
    pub max_roll_grace_secs: u64,
    /// The operator's OpenAPI 3 document (JSON) for the API docs page; none: no docs page.
    #[serde(default)]
    pub openapi: Option<PathBuf>,
}

fn default_session_ttl_secs() -> u64 {
    3600
}

fn default_max_roll_grace_secs() -> u64 {
    7 * 86_400
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// The gateway's admin listener (keys, limits and session links go through it).
    pub admin_url: String,
    /// The gateway's public URL, shown in code samples.
    pub public_url: String,
    /// How long an admin API call may take, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5000
}

impl Validate for PortalSettings {
    fn validate(&self) -> Result<(), Invalid> {
        socket_addr("portal.listen", &self.portal.listen)?;
        http_url("portal.url", &self.portal.url)?;
        in_range("portal.session_ttl_secs", self.portal.session_ttl_secs, 1, 86_400)?;
        in_range(
            "portal.max_roll_grace_secs",
            self.portal.max_roll_grace_secs,
            0,
            90 * 86_400,
        )?;
        http_url("gateway.admin_url", &self.gateway.admin_url)?;
        http_url("gateway.public_url", &self.gateway.public_url)?;
        in_range("gateway.timeout_ms", self.gateway.timeout_ms, 100, 60_000)?;
        self.clickhouse.validate("clickhouse")?;
        Ok(())
    }
}

impl PortalSettings {
    /// Whether the portal is served over TLS (as browsers see it): the cookie is then `Secure`.
    pub fn secure(&self) -> bool {
        self.portal.url.starts_with("https://")
    }
}

#[cfg(test)]
mod tests {
    use tollgate_runtime::settings::from_str_with_env;

    use super::*;

    const EXAMPLE: &str = include_str!("../../config/portal.toml");

    fn load(env: &[(&str, &str)]) -> Result<PortalSettings, String> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        from_str_with_env::<PortalSettings>(EXAMPLE, "portal.toml", env).map_err(|e| e.to_string())
    }

    #[test]
    fn the_example_loads() {
        let s = load(&[]).unwrap();
        assert_eq!(s.portal.listen, "127.0.0.1:8082");
        assert_eq!(s.portal.session_ttl_secs, 3600);
        assert!(!s.secure());
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (var, value, field) in [
            ("TOLLGATE_PORTAL__LISTEN", "localhost", "portal.listen"),
            ("TOLLGATE_PORTAL__URL", "portal", "portal.url"),
            ("TOLLGATE_PORTAL__SESSION_TTL_SECS", "0", "portal.session_ttl_secs"),
            (
                "TOLLGATE_PORTAL__MAX_ROLL_GRACE_SECS",
                "99999999",
                "portal.max_roll_grace_secs",
            ),
            ("TOLLGATE_GATEWAY__ADMIN_URL", "ftp://x", "gateway.admin_url"),
            ("TOLLGATE_GATEWAY__PUBLIC_URL", "x", "gateway.public_url"),
            ("TOLLGATE_GATEWAY__TIMEOUT_MS", "5", "gateway.timeout_ms"),
            ("TOLLGATE_CLICKHOUSE__DATABASE", "1db", "clickhouse.database"),
        ] {
            let err = load(&[(var, value)]).unwrap_err();
            assert!(err.contains(field), "{var}={value}: {err}");
        }
        let err = load(&[("TOLLGATE_PORTAL__LISTNE", "x")]).unwrap_err();
        assert!(err.contains("LISTNE") || err.contains("listne"), "{err}");
    }

    #[test]
    fn https_makes_the_cookie_secure() {
        assert!(load(&[("TOLLGATE_PORTAL__URL", "https://portal.example.com")])
            .unwrap()
            .secure());
    }
}

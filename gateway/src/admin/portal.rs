//! The admin API's side of the tenant portal: single-use session links, their exchange, a
//! per-key roll and the read-only limit status.
//!
//! In: `POST /v1/consumers/{name}/portal-sessions` from the operator's application (it
//! decides who may enter as which consumer), `POST /v1/portal-sessions/exchange` from the
//! portal (the token a browser brought), `POST /v1/consumers/{name}/keys/{id}/roll` and
//! `GET /v1/consumers/{name}/limits`. Out: a link `<portal.url>/session/<token>`, the
//! consumer a token was minted for (once), keys-topic records, and limit states.
//!
//! Why tokens live here, in memory: the token is minted and redeemed on the admin listener,
//! which both the operator's application and the portal already call with the admin token,
//! so it never crosses another channel; a token is 256 random bits kept only as its SHA-256,
//! and redeeming removes it under one lock, so two exchanges of one token cannot both pass.
//! What that costs: the portal must exchange on the gateway that minted (the one it is
//! configured with; with several gateways, point the operator's application at that one
//! too), and a gateway restart voids links not yet opened (they last minutes; mint again).
//! Nothing of a session goes to the keys topic: it is not a consumer's state, and every
//! follower of the topic would have to learn a record kind it has no use for.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate_runtime::admin_api as api;
use tollgate_runtime::settings::{http_url, in_range, Invalid};
use tollgate_schemas::{encode, ApiKeyRecord, EntityKey};

use super::{bad_request, from_json, json_response, key_json, not_found, now_ms, parse_time, Admin, Reply};
use crate::problem::Problem;

/// `[portal]` in the gateway's settings: where session links point and how long they last.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalLinkSettings {
    /// The portal's base URL as browsers reach it, e.g. `https://portal.example.com`.
    pub url: String,
    /// How long a session link can be opened, in seconds.
    #[serde(default = "default_link_ttl_secs")]
    pub link_ttl_secs: u64,
}

fn default_link_ttl_secs() -> u64 {
    300
}

impl PortalLinkSettings {
    pub fn validate(&self) -> Result<(), Invalid> {
        http_url("portal.url", &self.url)?;
        if self.url.contains(['?', '#']) {
            return Err(Invalid::new(
                "portal.url",
                &self.url,
                "a base URL without query or fragment",
            ));
        }
        in_range("portal.link_ttl_secs", self.link_ttl_secs, 10, 3600)?;
        Ok(())
    }
}

/// Links minted and not yet opened, by the SHA-256 of their token.
pub struct PortalLinks {
    settings: PortalLinkSettings,
    pending: Mutex<HashMap<[u8; 32], Pending>>,
}

struct Pending {
    consumer_id: String,
    return_url: Option<String>,
    expires_at_ms: i64,
}

/// Why a token cannot be exchanged.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("the link is unknown or was already used")]
    Unknown,
    #[error("the link expired")]
    Expired,
}

impl PortalLinks {
    pub fn new(settings: PortalLinkSettings) -> Self {
        Self {
            settings,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// A new token for `consumer_id`, valid until the returned time.
    pub fn mint(&self, consumer_id: &str, return_url: Option<String>, now_ms: i64) -> (String, i64) {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the OS random source is available");
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        let expires_at_ms = now_ms + self.settings.link_ttl_secs as i64 * 1000;
        let mut pending = self.pending.lock().expect("portal links lock");
        // Expired links go when new ones come: the map holds at most one TTL's worth.
        pending.retain(|_, p| p.expires_at_ms > now_ms);
        pending.insert(
            digest(&token),
            Pending {
                consumer_id: consumer_id.to_owned(),
                return_url,
                expires_at_ms,
            },
        );
        (token, expires_at_ms)
    }

    /// Redeems `token` once: the consumer id and return URL it was minted with.
    pub fn exchange(&self, token: &str, now_ms: i64) -> Result<(String, Option<String>), ExchangeError> {
        let found = self
            .pending
            .lock()
            .expect("portal links lock")
            .remove(&digest(token))
            .ok_or(ExchangeError::Unknown)?;
        if found.expires_at_ms <= now_ms {
            return Err(ExchangeError::Expired);
        }
        Ok((found.consumer_id, found.return_url))
    }

    pub fn url(&self, token: &str) -> String {
        format!("{}/session/{token}", self.settings.url.trim_end_matches('/'))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct MintBody {
    return_url: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExchangeBody {
    token: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RollOneBody {
    /// Until when the rolled key keeps working.
    expires_on: String,
    description: Option<String>,
}

impl Admin {
    fn links(&self) -> Result<&PortalLinks, Problem> {
        self.portal.as_ref().ok_or_else(|| {
            Problem::new(StatusCode::CONFLICT, "portal-not-configured", "Conflict")
                .with_detail("this gateway has no [portal] section: set portal.url to mint session links")
        })
    }

    pub(super) async fn mint_portal_session(&self, name: &str, body: Value) -> Reply {
        let consumer = self.consumer(name)?;
        let body: MintBody = from_json(body)?;
        if let Some(url) = &body.return_url {
            if url.len() > 2048 || http_url("returnUrl", url).is_err() {
                return Err(bad_request(
                    "returnUrl must be an absolute http:// or https:// URL of at most 2048 bytes",
                ));
            }
        }
        let links = self.links()?;
        let (token, expires_at_ms) = links.mint(&consumer.id, body.return_url, now_ms());
        Ok(json_response(
            StatusCode::CREATED,
            json!(api::PortalLink {
                url: links.url(&token),
                expires_at: api::time(expires_at_ms),
            }),
        ))
    }

    pub(super) async fn exchange_portal_session(&self, body: Value) -> Reply {
        let body: ExchangeBody = from_json(body)?;
        let (consumer_id, return_url) = self
            .links()?
            .exchange(&body.token, now_ms())
            .map_err(|e| Problem::new(StatusCode::GONE, "portal-link-unusable", "Gone").with_detail(e.to_string()))?;
        let consumer = self
            .store
            .directory()
            .read()
            .expect("directory lock")
            .consumer_by_id(&consumer_id)
            .ok_or_else(|| {
                Problem::new(StatusCode::GONE, "portal-link-unusable", "Gone")
                    .with_detail("the consumer of this link no longer exists")
            })?;
        Ok(json_response(
            StatusCode::OK,
            json!(api::PortalSession {
                consumer: consumer.name.clone(),
                tenant_id: consumer.tenant_id.clone(),
                return_url,
                key_environment: self.key_env.clone(),
            }),
        ))
    }

    /// Rolls one key: a new key (`rolledFrom` the old), and the old one valid until
    /// `expiresOn` (or its own earlier expiry). A key of another consumer is not found.
    pub(super) async fn roll_one_key(&self, name: &str, id: &str, body: Value, actor: &str) -> Reply {
        let consumer = self.consumer(name)?;
        let body: RollOneBody = from_json(body)?;
        let deadline = parse_time(&body.expires_on)?;
        let now = now_ms();
        let old: ApiKeyRecord = self
            .store
            .directory()
            .read()
            .expect("directory lock")
            .key(id)
            .filter(|k| k.consumer_id == consumer.id)
            .filter(|k| k.revoked_at_ms.is_none() && k.expires_at_ms.is_none_or(|at| at > now))
            .cloned()
            .ok_or_else(|| not_found(format!("consumer {name:?} has no active key {id:?}")))?;
        let (record, plaintext) = self.new_key(
            &consumer,
            body.description.or(Some(old.description.clone())),
            old.labels.clone(),
            None,
            Some(old.id.clone()),
            actor,
        );
        // The new key first: if the second write fails, the tenant still has a working key.
        self.write(&EntityKey::ApiKey(&record.id).to_string(), Some(encode(&record)))
            .await?;
        let mut rolled = old;
        rolled.expires_at_ms = Some(rolled.expires_at_ms.map_or(deadline, |at| at.min(deadline)));
        rolled.version += 1;
        rolled.updated_by = actor.to_owned();
        self.write(&EntityKey::ApiKey(&rolled.id).to_string(), Some(encode(&rolled)))
            .await?;
        Ok(json_response(StatusCode::CREATED, key_json(&record, Some(&plaintext))))
    }

    pub(super) async fn limits(&self, name: &str) -> Reply {
        let consumer = self.consumer(name)?;
        Ok(json_response(
            StatusCode::OK,
            json!(self.proxy.limit_status(&consumer).await),
        ))
    }
}

/// Who a write is attributed to: `admin-api`, or `portal:<consumer>` when the portal (holding
/// the admin token) acts for the consumer named in the path, said in `tollgate-actor`.
pub(super) fn actor(header: Option<&str>, consumer: Option<&str>) -> Result<String, Problem> {
    match (header, consumer) {
        (None, _) => Ok(super::ACTOR.to_owned()),
        (Some(value), Some(name)) if value.strip_prefix("portal:") == Some(name) => Ok(value.to_owned()),
        (Some(_), _) => Err(bad_request(
            "tollgate-actor must be `portal:<consumer>` naming the consumer of the path",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(ttl: u64) -> PortalLinks {
        PortalLinks::new(PortalLinkSettings {
            url: "http://127.0.0.1:8082/".into(),
            link_ttl_secs: ttl,
        })
    }

    #[test]
    fn a_token_is_redeemed_once_and_only_before_it_expires() {
        let l = links(60);
        let (token, expires) = l.mint("c1", None, 1_000);
        assert_eq!(expires, 61_000);
        assert!(token.len() >= 43, "256 bits in base64url");
        assert_eq!(l.url(&token), format!("http://127.0.0.1:8082/session/{token}"));
        assert_eq!(l.exchange(&token, 2_000), Ok(("c1".to_owned(), None)));
        assert_eq!(l.exchange(&token, 2_000), Err(ExchangeError::Unknown));
        let (late, _) = l.mint("c1", None, 1_000);
        assert_eq!(l.exchange(&late, 61_000), Err(ExchangeError::Expired));
        assert_eq!(l.exchange(&late, 1_000), Err(ExchangeError::Unknown));
        assert_eq!(l.exchange("made-up", 1_000), Err(ExchangeError::Unknown));
    }

    #[test]
    fn only_digests_are_kept() {
        let l = links(60);
        let (token, _) = l.mint("c1", None, 0);
        let pending = l.pending.lock().unwrap();
        assert!(pending.contains_key(&digest(&token)));
        assert_eq!(pending.len(), 1);
    }

    #[test]
    fn the_actor_names_the_consumer_of_the_path() {
        assert_eq!(actor(None, Some("acme")).unwrap(), "admin-api");
        assert_eq!(actor(Some("portal:acme"), Some("acme")).unwrap(), "portal:acme");
        assert!(actor(Some("portal:other"), Some("acme")).is_err());
        assert!(actor(Some("someone"), Some("acme")).is_err());
        assert!(actor(Some("portal:acme"), None).is_err());
    }

    #[test]
    fn settings_refuse_bad_links() {
        let bad = |url: &str, ttl| {
            PortalLinkSettings {
                url: url.into(),
                link_ttl_secs: ttl,
            }
            .validate()
            .unwrap_err()
            .to_string()
        };
        assert!(bad("portal.example", 300).contains("portal.url"));
        assert!(bad("https://p.example/?a=1", 300).contains("without query"));
        assert!(bad("https://p.example", 5).contains("portal.link_ttl_secs"));
        assert!(bad("https://p.example", 7200).contains("portal.link_ttl_secs"));
    }
}

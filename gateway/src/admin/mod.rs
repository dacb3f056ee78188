//! The admin API: consumers, their API keys and their tenants' budgets (`budget`), over JSON,
//! on the admin listener.
//!
//! In: operator requests with `Authorization: Bearer <admin token>`. Out: records written to
//! the keys topic through [`KeyStore`] (answered once applied locally), JSON views of the
//! directory, and RFC 9457 problems for every refusal. Plaintext keys leave only in the one
//! response that creates them.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;
use tollgate_schemas::{encode, ApiKeyRecord, ConsumerRecord, EntityKey};

mod budget;
mod operations;
pub mod portal;
mod terms;

use self::operations::Op;
use tollgate_runtime::admin_api as api;

use crate::apikey;
use crate::directory::Consumer;
use crate::keystore::KeyStore;
use crate::problem::Problem;
use crate::settings::IdentitySettings;

/// Largest admin request body: consumers and keys are small.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Who admin API writes are attributed to in the records.
const ACTOR: &str = "admin-api";

pub struct Admin {
    pub store: KeyStore,
    pub token: String,
    pub key_env: String,
    pub identity: IdentitySettings,
    /// Defined plans: a consumer may only name one of these, and only override their limits.
    pub plans: std::collections::BTreeMap<String, crate::limits::PlanSettings>,
    /// The meters those plans' limits may count.
    pub meters: crate::limits::Meters,
    /// Month-to-date spend for the budget views, when `[budgets]` is configured.
    pub spend: Option<Arc<crate::spend::SpendLedger>>,
    /// The request chain, for the limit status (its limits and limiter, read-only).
    pub proxy: Arc<crate::chain::Proxy>,
    /// Portal session links, when `[portal]` is configured.
    pub portal: Option<portal::PortalLinks>,
}

type Reply = Result<Response<Full<Bytes>>, Problem>;

impl Admin {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.route(req).await.unwrap_or_else(Problem::into_response)
    }

    async fn route(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let method = req.method().clone();
        let (op, params) = operations::resolve(&method, &path)?;
        if op == Op::OpenApi {
            return Ok(json_response(StatusCode::OK, json!(operations::document())));
        }
        self.authorize(&req)?;
        let name = params.first().copied().unwrap_or_default().to_owned();
        let id = params.get(1).copied().unwrap_or_default().to_owned();
        let actor = portal::actor(
            req.headers().get("tollgate-actor").and_then(|v| v.to_str().ok()),
            path.starts_with("/v1/consumers/").then_some(name.as_str()),
        )?;
        match op {
            Op::OpenApi => unreachable!("answered above"),
            Op::CreateConsumer => self.create_consumer(read_json(req).await?).await,
            Op::ListConsumers => Ok(self.list_consumers()),
            Op::GetConsumer => Ok(json_response(StatusCode::OK, consumer_json(&*self.consumer(&name)?))),
            Op::PatchConsumer => self.patch_consumer(&name, read_json(req).await?).await,
            Op::DeleteConsumer => self.delete_consumer(&name).await,
            Op::CreateKey => self.create_key(&name, read_json(req).await?, &actor).await,
            Op::ListKeys => self.list_keys(&name),
            Op::RollKeys => self.roll_key(&name, read_json(req).await?, &actor).await,
            Op::RevokeKey => self.revoke_key(&name, &id, &actor).await,
            Op::RollKey => self.roll_one_key(&name, &id, read_json(req).await?, &actor).await,
            Op::Limits => self.limits(&name).await,
            Op::MintPortalSession => self.mint_portal_session(&name, read_json(req).await?).await,
            Op::ExchangePortalSession => self.exchange_portal_session(read_json(req).await?).await,
            Op::PutBudget => self.put_budget(&name, read_json(req).await?).await,
            Op::GetBudget => self.get_budget(&name),
            Op::DeleteBudget => self.delete_budget(&name).await,
        }
    }

    fn authorize<B>(&self, req: &Request<B>) -> Result<(), Problem> {
        let presented = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if bool::from(presented.as_bytes().ct_eq(self.token.as_bytes())) {
            Ok(())
        } else {
            Err(
                Problem::new(StatusCode::UNAUTHORIZED, "admin-unauthorized", "Unauthorized")
                    .with_detail("the admin API needs `Authorization: Bearer <TOLLGATE_ADMIN_TOKEN>`"),
            )
        }
    }

    fn consumer(&self, name: &str) -> Result<Arc<Consumer>, Problem> {
        self.store
            .directory()
            .read()
            .expect("directory lock")
            .consumer_by_name(name)
            .ok_or_else(|| not_found(format!("no consumer named {name:?}")))
    }

    async fn write(&self, key: &str, payload: Option<Vec<u8>>) -> Result<(), Problem> {
        self.store.write(key, payload).await.map_err(|err| {
            tracing::error!(error = %err, "admin write failed");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Service Unavailable",
            )
            .with_detail("the change could not be stored; retry later")
        })
    }

    async fn create_consumer(&self, body: Value) -> Reply {
        let body: NewConsumer = from_json(body)?;
        validate_name(&body.name)?;
        if self.consumer(&body.name).is_ok() {
            return Err(conflict(&body.name));
        }
        let now = now_ms();
        let id = uuid::Uuid::now_v7().to_string();
        let mut metadata = body.metadata;
        let named = self.named_terms(&metadata);
        self.inherit_terms(&mut metadata, &named);
        let record = self.consumer_record(id, &body.name, metadata, now, now, 1)?;
        self.write(&EntityKey::Consumer(&record.id).to_string(), Some(encode(&record)))
            .await?;
        // Two creates of one name race on the topic: the earlier record wins everywhere.
        match self.consumer(&body.name) {
            Ok(winner) if winner.id == record.id => {
                self.spread_terms(&winner.metadata, &winner.tenant_id, &winner.id)
                    .await?;
                Ok(json_response(StatusCode::CREATED, consumer_json(&winner)))
            }
            _ => {
                self.write(&EntityKey::Consumer(&record.id).to_string(), None).await?;
                Err(conflict(&body.name))
            }
        }
    }

    fn consumer_record(
        &self,
        id: String,
        name: &str,
        metadata: Map<String, Value>,
        created_at_ms: i64,
        updated_at_ms: i64,
        version: i64,
    ) -> Result<ConsumerRecord, Problem> {
        let field = |key: &str| -> Result<Option<String>, Problem> {
            match metadata.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(_) => Err(bad_request(format!("metadata.{key} must be a non-empty string"))),
            }
        };
        let tenant_id = field(&self.identity.tenant_field)?;
        crate::directory::check_tenant(tenant_id.as_deref())
            .map_err(|e| bad_request(format!("metadata.{}: {e}", self.identity.tenant_field)))?;
        let stripe_customer_id = field(&self.identity.stripe_customer_field)?;
        crate::directory::check_stripe_customer(stripe_customer_id.as_deref())
            .map_err(|e| bad_request(format!("metadata.{}: {e}", self.identity.stripe_customer_field)))?;
        let plan = field(&self.identity.plan_field)?;
        // Overrides are checked against the plan that will apply: the named one, or the default.
        if let Some(limited_by) = plan.as_ref().or(self.identity.default_plan.as_ref()) {
            let Some(settings) = self.plans.get(limited_by) else {
                return Err(bad_request(format!(
                    "plan {limited_by:?} is not defined (defined: {})",
                    self.plans.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            };
            crate::limits::effective_limits(settings, &self.meters, &Value::Object(metadata.clone()))
                .map_err(|e| bad_request(e.to_string()))?;
        }
        for key in [&self.identity.tenant_field, &self.identity.plan_field] {
            if let Some(Value::String(v)) = metadata.get(key) {
                // These travel in headers to the upstream and as Kafka keys.
                if v.len() > 256 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(bad_request(format!(
                        "metadata.{key} must be 1 to 256 visible ASCII characters"
                    )));
                }
            }
        }
        Ok(ConsumerRecord {
            id,
            name: name.to_owned(),
            tenant_id,
            plan,
            stripe_customer_id,
            metadata_json: Value::Object(metadata).to_string(),
            created_at_ms,
            updated_at_ms,
            version,
            updated_by: ACTOR.to_owned(),
        })
    }

    fn list_consumers(&self) -> Response<Full<Bytes>> {
        let all = self.store.directory().read().expect("directory lock").consumers();
        json_response(
            StatusCode::OK,
            json!(api::ConsumerList {
                data: all.iter().map(|c| consumer_view(c)).collect()
            }),
        )
    }

    async fn patch_consumer(&self, name: &str, body: Value) -> Reply {
        let current = self.consumer(name)?;
        let patch: ConsumerPatch = from_json(body)?;
        let mut metadata = current.metadata.clone();
        let named = self.named_terms(&patch.metadata);
        // JSON merge patch (RFC 7396) on the metadata: null removes a field.
        for (key, value) in patch.metadata {
            if value.is_null() {
                metadata.remove(&key);
            } else {
                metadata.insert(key, value);
            }
        }
        self.inherit_terms(&mut metadata, &named);
        let record = self.consumer_record(
            current.id.clone(),
            name,
            metadata,
            current.created_at_ms,
            now_ms(),
            current.version + 1,
        )?;
        self.write(&EntityKey::Consumer(&record.id).to_string(), Some(encode(&record)))
            .await?;
        let updated = self.consumer(name)?;
        self.spread_terms(&updated.metadata, &updated.tenant_id, &updated.id)
            .await?;
        Ok(json_response(StatusCode::OK, consumer_json(&updated)))
    }

    async fn delete_consumer(&self, name: &str) -> Reply {
        let consumer = self.consumer(name)?;
        let keys = self
            .store
            .directory()
            .read()
            .expect("directory lock")
            .keys_of(&consumer.id);
        // Keys first: a consumer is never left with keys that outlive it.
        for key in keys {
            self.write(&EntityKey::ApiKey(&key.id).to_string(), None).await?;
        }
        self.write(&EntityKey::Consumer(&consumer.id).to_string(), None).await?;
        Ok(empty(StatusCode::NO_CONTENT))
    }

    async fn create_key(&self, name: &str, body: Value, actor: &str) -> Reply {
        let consumer = self.consumer(name)?;
        let body: NewKeyBody = from_json(body)?;
        let expires_at_ms = body.expires_on.as_deref().map(parse_future_time).transpose()?;
        let (record, plaintext) = self.new_key(&consumer, body.description, body.labels, expires_at_ms, None, actor);
        self.write(&EntityKey::ApiKey(&record.id).to_string(), Some(encode(&record)))
            .await?;
        Ok(json_response(StatusCode::CREATED, key_json(&record, Some(&plaintext))))
    }

    fn new_key(
        &self,
        consumer: &Consumer,
        description: Option<String>,
        labels: BTreeMap<String, String>,
        expires_at_ms: Option<i64>,
        rolled_from: Option<String>,
        actor: &str,
    ) -> (ApiKeyRecord, String) {
        let key = apikey::generate(&self.key_env);
        let record = ApiKeyRecord {
            id: format!("key_{}", uuid::Uuid::now_v7().simple()),
            consumer_id: consumer.id.clone(),
            consumer_name: consumer.name.clone(),
            prefix: key.prefix.clone(),
            secret_sha256: key.digest,
            description: description.unwrap_or_default(),
            labels,
            created_at_ms: now_ms(),
            expires_at_ms,
            revoked_at_ms: None,
            rolled_from,
            version: 1,
            updated_by: actor.to_owned(),
        };
        (record, key.plaintext)
    }

    fn list_keys(&self, name: &str) -> Reply {
        let consumer = self.consumer(name)?;
        let keys = self
            .store
            .directory()
            .read()
            .expect("directory lock")
            .keys_of(&consumer.id);
        Ok(json_response(
            StatusCode::OK,
            json!(api::KeyList {
                data: keys.iter().map(|k| key_view(k, None)).collect()
            }),
        ))
    }

    async fn roll_key(&self, name: &str, body: Value, actor: &str) -> Reply {
        let consumer = self.consumer(name)?;
        let body: RollBody = from_json(body)?;
        let deadline = parse_time(&body.expires_on)?;
        let now = now_ms();
        let current: Vec<ApiKeyRecord> = self
            .store
            .directory()
            .read()
            .expect("directory lock")
            .keys_of(&consumer.id)
            .into_iter()
            .filter(|k| k.revoked_at_ms.is_none() && k.expires_at_ms.is_none_or(|at| at > now))
            .collect();
        // The new key first: if anything below fails, the consumer still has a working key.
        let rolled_from = current.last().map(|k| k.id.clone());
        let (record, plaintext) = self.new_key(&consumer, body.description, BTreeMap::new(), None, rolled_from, actor);
        self.write(&EntityKey::ApiKey(&record.id).to_string(), Some(encode(&record)))
            .await?;
        for mut old in current {
            old.expires_at_ms = Some(old.expires_at_ms.map_or(deadline, |at| at.min(deadline)));
            old.version += 1;
            old.updated_by = actor.to_owned();
            self.write(&EntityKey::ApiKey(&old.id).to_string(), Some(encode(&old)))
                .await?;
        }
        Ok(json_response(StatusCode::CREATED, key_json(&record, Some(&plaintext))))
    }

    async fn revoke_key(&self, name: &str, id: &str, actor: &str) -> Reply {
        let consumer = self.consumer(name)?;
        let key = self
            .store
            .directory()
            .read()
            .expect("directory lock")
            .key(id)
            .filter(|k| k.consumer_id == consumer.id)
            .cloned()
            .ok_or_else(|| not_found(format!("consumer {name:?} has no key {id:?}")))?;
        if key.revoked_at_ms.is_none() {
            let mut revoked = key;
            revoked.revoked_at_ms = Some(now_ms());
            revoked.version += 1;
            revoked.updated_by = actor.to_owned();
            self.write(&EntityKey::ApiKey(&revoked.id).to_string(), Some(encode(&revoked)))
                .await?;
        }
        Ok(empty(StatusCode::NO_CONTENT))
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewConsumer {
    name: String,
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ConsumerPatch {
    #[serde(default)]
    metadata: Map<String, Value>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct NewKeyBody {
    description: Option<String>,
    expires_on: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RollBody {
    /// Grace deadline for the keys being replaced.
    expires_on: String,
    description: Option<String>,
}

/// The body as JSON: `application/json` (or `+json`) only (415 otherwise), and no member name
/// twice in any object (400: serde keeps the last, other readers the first).
async fn read_json(req: Request<Incoming>) -> Result<Value, Problem> {
    let json_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v == "application/json" || v.ends_with("+json"));
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| {
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "Payload Too Large")
                .with_detail(format!("admin request bodies are limited to {MAX_BODY_BYTES} bytes"))
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    if !json_type {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported Media Type",
        )
        .with_detail("admin request bodies are JSON: send Content-Type: application/json"));
    }
    crate::strict_json::parse(&bytes).map_err(|e| bad_request(format!("body is not acceptable JSON: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, Problem> {
    serde_json::from_value(body).map_err(|e| bad_request(e.to_string()))
}

fn validate_name(name: &str) -> Result<(), Problem> {
    crate::directory::check_name(name).map_err(|e| bad_request(e.to_string()))
}

fn parse_time(value: &str) -> Result<i64, Problem> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.timestamp_millis())
        .map_err(|_| bad_request(format!("{value:?} is not an RFC 3339 time like 2026-12-31T23:59:59Z")))
}

fn parse_future_time(value: &str) -> Result<i64, Problem> {
    let at = parse_time(value)?;
    if at <= now_ms() {
        return Err(bad_request(format!("expiresOn {value:?} is in the past")));
    }
    Ok(at)
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn consumer_view(c: &Consumer) -> api::Consumer {
    api::Consumer {
        id: c.id.clone(),
        name: c.name.clone(),
        metadata: c.metadata.clone(),
        created_on: api::time(c.created_at_ms),
        updated_on: api::time(c.updated_at_ms),
    }
}

fn consumer_json(c: &Consumer) -> Value {
    json!(consumer_view(c))
}

fn key_view(k: &ApiKeyRecord, plaintext: Option<&str>) -> api::ApiKey {
    api::ApiKey {
        id: k.id.clone(),
        prefix: k.prefix.clone(),
        description: k.description.clone(),
        labels: k.labels.clone(),
        created_on: api::time(k.created_at_ms),
        expires_on: k.expires_at_ms.map(api::time),
        revoked_on: k.revoked_at_ms.map(api::time),
        key: plaintext.map(str::to_owned),
    }
}

fn key_json(k: &ApiKeyRecord, plaintext: Option<&str>) -> Value {
    json!(key_view(k, plaintext))
}

fn json_response(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid")
}

fn bad_request(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-request", "Bad Request").with_detail(detail)
}

fn not_found(detail: String) -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "not-found", "Not Found").with_detail(detail)
}

fn conflict(name: &str) -> Problem {
    Problem::new(StatusCode::CONFLICT, "consumer-exists", "Conflict")
        .with_detail(format!("a consumer named {name:?} exists"))
}

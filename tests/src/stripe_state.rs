//! What Stripe would remember, for the billing proxy: stripe-mock is stateless (it validates
//! each request against Stripe's OpenAPI spec and answers a fixture), so lookups that must
//! find what an earlier call created (meters by event name, products by id, prices by
//! `lookup_key`) are answered here from the creations the proxy forwarded. Test code only:
//! billing-sync itself talks to whatever is at `stripe.api_base`.
//!
//! In: each forwarded request (method, path, query, form) and stripe-mock's answer. Out: the
//! answer billing-sync gets: stripe-mock's for everything else, ours for those lookups.

use std::collections::{BTreeMap, HashMap, HashSet};

use hyper::body::Bytes;
use serde_json::{json, Value};

#[derive(Default)]
pub struct StripeState {
    /// Meter event name → the meter as created.
    meters: BTreeMap<String, Value>,
    products: HashSet<String>,
    /// Lookup key → the price holding it now (a newer price with `transfer_lookup_key` takes it).
    prices: HashMap<String, Value>,
}

impl StripeState {
    /// The answer billing-sync gets to `method path?query` (form `form`), given stripe-mock's.
    pub fn answer(
        &mut self,
        method: &str,
        path: &str,
        query: &HashMap<String, Vec<String>>,
        form: &HashMap<String, String>,
        status: u16,
        body: Bytes,
    ) -> (u16, Bytes) {
        let mut parsed: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return (status, body),
        };
        let encode = |v: &Value| Bytes::from(serde_json::to_vec(v).expect("json"));
        match (method, path) {
            ("POST", "/v1/billing/meters") if status == 200 => {
                parsed["event_name"] = form.get("event_name").cloned().unwrap_or_default().into();
                self.meters
                    .insert(form.get("event_name").cloned().unwrap_or_default(), parsed.clone());
                (status, encode(&parsed))
            }
            ("GET", "/v1/billing/meters") => {
                let data: Vec<Value> = self.meters.values().cloned().collect();
                (
                    200,
                    encode(&json!({"object": "list", "data": data, "has_more": false, "url": path})),
                )
            }
            ("POST", "/v1/products") if status == 200 => {
                let id = form.get("id").cloned().unwrap_or_default();
                parsed["id"] = id.clone().into();
                self.products.insert(id);
                (status, encode(&parsed))
            }
            ("GET", p) if p.starts_with("/v1/products/") => {
                let id = p.trim_start_matches("/v1/products/");
                if self.products.contains(id) {
                    (status, body)
                } else {
                    let missing = json!({"error": {"type": "invalid_request_error", "code": "resource_missing",
                        "message": format!("No such product: '{id}'")}});
                    (404, encode(&missing))
                }
            }
            ("POST", "/v1/prices") if status == 200 => {
                let lookup_key = form.get("lookup_key").cloned().unwrap_or_default();
                let mut metadata = serde_json::Map::new();
                for (k, v) in form {
                    if let Some(name) = k.strip_prefix("metadata[").and_then(|k| k.strip_suffix(']')) {
                        metadata.insert(name.to_owned(), v.clone().into());
                    }
                }
                parsed["lookup_key"] = lookup_key.clone().into();
                parsed["metadata"] = Value::Object(metadata);
                parsed["unit_amount_decimal"] = form.get("unit_amount_decimal").cloned().into();
                parsed["form"] = json!(form);
                self.prices.insert(lookup_key, parsed.clone());
                (status, encode(&parsed))
            }
            ("GET", "/v1/prices") => {
                let keys = query.get("lookup_keys[]").cloned().unwrap_or_default();
                let data: Vec<Value> = keys.iter().filter_map(|k| self.prices.get(k).cloned()).collect();
                (
                    200,
                    encode(&json!({"object": "list", "data": data, "has_more": false, "url": path})),
                )
            }
            _ => (status, body),
        }
    }

    /// The price that holds `lookup_key` now, as created (with the form it was created from).
    pub fn price(&self, lookup_key: &str) -> Option<Value> {
        self.prices.get(lookup_key).cloned()
    }
}

/// Query parameters, repeated ones kept in order (`lookup_keys[]=a&lookup_keys[]=b`).
pub fn query_params(query: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.entry(crate::billing::decode(k))
            .or_default()
            .push(crate::billing::decode(v));
    }
    out
}

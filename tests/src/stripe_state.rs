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
    /// Every price by id, with the form it was created from.
    prices_by_id: HashMap<String, Value>,
    /// Subscription id → (customer, price ids of its items).
    subscriptions: HashMap<String, (String, Vec<String>)>,
    /// Meter events by identifier (Stripe counts an identifier once): (customer, event name,
    /// value, timestamp).
    meter_events: HashMap<String, (String, String, i64, i64)>,
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
                self.prices_by_id
                    .insert(parsed["id"].as_str().unwrap_or_default().to_owned(), parsed.clone());
                (status, encode(&parsed))
            }
            ("POST", "/v1/billing/meter_events") if status == 200 => {
                let field = |k: &str| form.get(k).cloned().unwrap_or_default();
                self.meter_events.insert(
                    field("identifier"),
                    (
                        field("payload[stripe_customer_id]"),
                        field("event_name"),
                        field("payload[value]").parse().unwrap_or(0),
                        field("timestamp").parse().unwrap_or(0),
                    ),
                );
                (status, body)
            }
            ("POST", "/v1/subscriptions") if status == 200 => {
                let id = parsed["id"].as_str().unwrap_or_default().to_owned();
                self.subscriptions.insert(
                    id,
                    (form.get("customer").cloned().unwrap_or_default(), item_prices(form)),
                );
                (status, body)
            }
            ("POST", p) if p.starts_with("/v1/subscriptions/") && status == 200 => {
                let id = p.trim_start_matches("/v1/subscriptions/");
                let prices = item_prices(form);
                if let (Some(sub), false) = (self.subscriptions.get_mut(id), prices.is_empty()) {
                    // Every old item is deleted and the new prices added (what billing-sync sends).
                    sub.1 = prices;
                }
                (status, body)
            }
            ("POST", "/v1/invoices/create_preview") if status == 200 => {
                let subtotal = self.preview(form.get("subscription").map(String::as_str).unwrap_or_default());
                parsed["subtotal"] = subtotal.into();
                parsed["total"] = subtotal.into();
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

    /// The upcoming invoice's subtotal: each item's price applied to this month's meter
    /// events (the subscription is anchored to the first of the month), and licensed prices
    /// once.
    fn preview(&self, subscription: &str) -> i64 {
        let Some((customer, prices)) = self.subscriptions.get(subscription) else {
            return 0;
        };
        let month_start = {
            use chrono::Datelike;
            let now = chrono::Utc::now();
            chrono::NaiveDate::from_ymd_opt(now.year(), now.month(), 1)
                .expect("first of the month")
                .and_hms_opt(0, 0, 0)
                .expect("midnight")
                .and_utc()
                .timestamp()
        };
        let event_of_meter: HashMap<String, String> = self
            .meters
            .iter()
            .map(|(event, m)| (m["id"].as_str().unwrap_or_default().to_owned(), event.clone()))
            .collect();
        let mut subtotal = 0;
        for price in prices.iter().filter_map(|p| self.prices_by_id.get(p)) {
            let form = &price["form"];
            let text = |k: &str| form[k].as_str().unwrap_or_default().to_owned();
            if text("recurring[usage_type]") == "licensed" {
                subtotal += text("unit_amount").parse::<i64>().unwrap_or(0);
                continue;
            }
            let event = event_of_meter
                .get(&text("recurring[meter]"))
                .cloned()
                .unwrap_or_default();
            let quantity: i64 = self
                .meter_events
                .values()
                .filter(|(c, e, _, t)| c == customer && *e == event && *t >= month_start)
                .map(|(_, _, v, _)| v)
                .sum();
            let (free, unit) = if text("tiers_mode") == "graduated" {
                (
                    text("tiers[0][up_to]").parse().unwrap_or(0),
                    text("tiers[1][unit_amount_decimal]"),
                )
            } else {
                (0, text("unit_amount_decimal"))
            };
            subtotal += round_half_up(i128::from((quantity - free).max(0)) * pico(&unit));
        }
        subtotal
    }

    /// Changes the amount (a fee's, or a metered price's per unit) Stripe holds for the price
    /// at `lookup_key`, as an edit made
    /// in Stripe behind Tollgate's back would.
    pub fn set_unit_price(&mut self, lookup_key: &str, decimal: &str) {
        let id = self.prices[lookup_key]["id"].as_str().unwrap_or_default().to_owned();
        for price in [self.prices.get_mut(lookup_key), self.prices_by_id.get_mut(&id)]
            .into_iter()
            .flatten()
        {
            let form = &mut price["form"];
            let field = if form["recurring[usage_type]"] == "licensed" {
                "unit_amount"
            } else if form["tiers_mode"] == "graduated" {
                "tiers[1][unit_amount_decimal]"
            } else {
                "unit_amount_decimal"
            };
            form[field] = decimal.into();
        }
    }

    /// The price that holds `lookup_key` now, as created (with the form it was created from).
    pub fn price(&self, lookup_key: &str) -> Option<Value> {
        self.prices.get(lookup_key).cloned()
    }
}

fn item_prices(form: &HashMap<String, String>) -> Vec<String> {
    let mut items: Vec<(usize, String)> = form
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.strip_prefix("items[")?.strip_suffix("][price]")?.parse().ok()?,
                v.clone(),
            ))
        })
        .collect();
    items.sort();
    items.into_iter().map(|(_, p)| p).collect()
}

/// A decimal string in units of 10^-12.
fn pico(decimal: &str) -> i128 {
    let (int, frac) = decimal.split_once('.').unwrap_or((decimal, ""));
    let frac = format!("{frac:0<12}");
    int.parse::<i128>().unwrap_or(0) * 1_000_000_000_000 + frac[..12].parse::<i128>().unwrap_or(0)
}

fn round_half_up(pico: i128) -> i64 {
    ((pico + 500_000_000_000) / 1_000_000_000_000) as i64
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

//! The catalogue in Stripe: one product per plan, a flat monthly price for its fee and a
//! metered price per meter, attached to that meter's Stripe meter.
//!
//! In: the [`Catalogue`], the Stripe meter ids `setup` found or made, a [`Caller`]. Out:
//! products and prices in Stripe ([`setup_catalogue`], the `setup` subcommand) and, at run
//! time, the price ids of each plan ([`resolve`]).
//!
//! Recognition: a product's id is ours (`tollgate_plan_<plan>`), a price is found by its
//! `lookup_key` (`tollgate:<plan>:fee`, `tollgate:<plan>:meter:<meter>`) and compared by the
//! fingerprint of everything we send it, kept in its metadata. Stripe prices cannot change
//! their amounts (<https://docs.stripe.com/products-prices/manage-prices#edit-price>), so a
//! changed price is a new price that takes the lookup key over (`transfer_lookup_key`);
//! provisioning then moves subscriptions to it at their next period.

use std::collections::{BTreeMap, HashMap};

use sha2::{Digest, Sha256};
use tollgate_runtime::catalogue::{Catalogue, PlanPrices};

use crate::calls::{idempotency_key, CallError, Caller};
use crate::settings::MeterSettings;
use crate::stripe::Form;

/// Stripe's `lookup_keys` filter takes at most 10 keys per list call.
const LOOKUP_KEYS_PER_CALL: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum ProductsError {
    #[error("setup of {what}: {error}")]
    Stripe { what: String, error: CallError },
    #[error("plan {plan}: meter {meter} has no Stripe meter; run `setup`")]
    NoMeter { plan: String, meter: String },
}

/// What one price is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceKind {
    Fee,
    Meter { meter: String },
}

/// One price the catalogue asks for, as it is sent to Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceSpec {
    pub plan: String,
    pub kind: PriceKind,
    pub lookup_key: String,
    /// Digest of `form` without the account-specific meter id: equal fingerprints, same price.
    pub fingerprint: String,
    pub form: Form,
}

pub fn product_id(plan: &str) -> String {
    format!("tollgate_plan_{plan}")
}

/// The prices of `plan`, fee first, then meters in name order. `meter_ids` maps a meter event
/// name to its Stripe meter id.
pub fn price_specs(
    plan: &str,
    prices: &PlanPrices,
    meters: &[MeterSettings],
    meter_ids: &HashMap<String, String>,
) -> Result<Vec<PriceSpec>, ProductsError> {
    let mut specs = Vec::new();
    let base = |lookup_key: &str, nickname: String| {
        Form::new()
            .with("currency", prices.currency.clone())
            .with("product", product_id(plan))
            .with("lookup_key", lookup_key)
            .with("nickname", nickname)
            .with("recurring[interval]", "month")
            .with("metadata[tollgate_plan]", plan)
    };
    if prices.monthly_fee_minor > 0 {
        let lookup_key = format!("tollgate:{plan}:fee");
        let form = base(&lookup_key, format!("{plan} monthly fee"))
            .with("recurring[usage_type]", "licensed")
            .with("unit_amount", prices.monthly_fee_minor.to_string());
        specs.push(spec(plan, PriceKind::Fee, lookup_key, form, None));
    }
    for (meter, price) in &prices.meters {
        let lookup_key = format!("tollgate:{plan}:meter:{meter}");
        let event_name = meters
            .iter()
            .find(|m| &m.meter == meter)
            .map(|m| m.event_name.as_str())
            .unwrap_or_default();
        let meter_id = meter_ids.get(event_name).ok_or_else(|| ProductsError::NoMeter {
            plan: plan.to_owned(),
            meter: meter.clone(),
        })?;
        let mut form = base(&lookup_key, format!("{plan} {meter}"))
            .with("recurring[usage_type]", "metered")
            .with("metadata[tollgate_meter]", meter.clone());
        if price.included_units > 0 {
            // Graduated tiers: the included units at 0, the rest at the unit price.
            form = form
                .with("billing_scheme", "tiered")
                .with("tiers_mode", "graduated")
                .with("tiers[0][up_to]", price.included_units.to_string())
                .with("tiers[0][unit_amount]", "0")
                .with("tiers[1][up_to]", "inf")
                .with("tiers[1][unit_amount_decimal]", price.unit_price_minor.to_string());
        } else {
            form = form
                .with("billing_scheme", "per_unit")
                .with("unit_amount_decimal", price.unit_price_minor.to_string());
        }
        specs.push(spec(
            plan,
            PriceKind::Meter { meter: meter.clone() },
            lookup_key,
            form,
            Some((event_name, meter_id)),
        ));
    }
    Ok(specs)
}

fn spec(plan: &str, kind: PriceKind, lookup_key: String, mut form: Form, meter: Option<(&str, &String)>) -> PriceSpec {
    let mut hasher = Sha256::new();
    for (k, v) in &form.0 {
        hasher.update(k.as_bytes());
        hasher.update([0]);
        hasher.update(v.as_bytes());
        hasher.update([0]);
    }
    if let Some((event_name, _)) = meter {
        hasher.update(event_name.as_bytes());
    }
    let fingerprint: String = hasher.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    if let Some((_, id)) = meter {
        form.push("recurring[meter]", id.clone());
    }
    form.push("metadata[tollgate_fingerprint]", fingerprint.clone());
    PriceSpec {
        plan: plan.to_owned(),
        kind,
        lookup_key,
        fingerprint,
        form,
    }
}

/// What `setup` did with one Stripe object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupAction {
    Created,
    Found,
    /// A price whose amounts differ from the catalogue: a new price took its lookup key.
    Changed,
}

impl SetupAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SetupAction::Created => "created",
            SetupAction::Found => "found",
            SetupAction::Changed => "changed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupLine {
    /// `meter`, `product` or `price`.
    pub object: &'static str,
    /// Meter event name, plan, or price lookup key.
    pub name: String,
    pub action: SetupAction,
    pub id: String,
}

/// A price found in Stripe by lookup key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundPrice {
    pub id: String,
    pub fingerprint: String,
}

/// The active prices holding `lookup_keys`.
pub async fn find_prices(caller: &Caller, lookup_keys: &[String]) -> Result<HashMap<String, FoundPrice>, CallError> {
    let mut found = HashMap::new();
    for chunk in lookup_keys.chunks(LOOKUP_KEYS_PER_CALL) {
        let mut query = Form::new().with("active", "true").with("limit", "100");
        for key in chunk {
            query.push("lookup_keys[]", key.clone());
        }
        let page = caller.get("/prices", &query).await?;
        for price in page["data"].as_array().into_iter().flatten() {
            let (Some(key), Some(id)) = (price["lookup_key"].as_str(), price["id"].as_str()) else {
                continue;
            };
            found.insert(
                key.to_owned(),
                FoundPrice {
                    id: id.to_owned(),
                    fingerprint: price["metadata"]["tollgate_fingerprint"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                },
            );
        }
    }
    Ok(found)
}

/// Makes Stripe hold the catalogue: products created when missing, prices created when
/// missing or changed. A second run with the same catalogue creates nothing.
pub async fn setup_catalogue(
    caller: &Caller,
    catalogue: &Catalogue,
    meters: &[MeterSettings],
    meter_ids: &HashMap<String, String>,
) -> Result<Vec<SetupLine>, ProductsError> {
    let failed = |what: String| move |error| ProductsError::Stripe { what, error };
    let mut lines = Vec::new();
    let mut specs = Vec::new();
    for (plan, prices) in &catalogue.plans {
        let id = product_id(plan);
        let action = match caller.get(&format!("/products/{id}"), &Form::new()).await {
            Ok(_) => SetupAction::Found,
            Err(err) if err.is_not_found() => {
                let form = Form::new()
                    .with("id", id.clone())
                    .with("name", format!("Tollgate {plan}"))
                    .with("metadata[tollgate_plan]", plan.clone());
                caller
                    .post("/products", &form, &idempotency_key(&["tollgate-product", plan]))
                    .await
                    .map_err(failed(format!("product {id}")))?;
                SetupAction::Created
            }
            Err(err) => return Err(failed(format!("product {id}"))(err)),
        };
        lines.push(SetupLine {
            object: "product",
            name: plan.clone(),
            action,
            id,
        });
        specs.extend(price_specs(plan, prices, meters, meter_ids)?);
    }
    let keys: Vec<String> = specs.iter().map(|s| s.lookup_key.clone()).collect();
    let found = find_prices(caller, &keys)
        .await
        .map_err(failed("price lookup".to_owned()))?;
    for spec in specs {
        let existing = found.get(&spec.lookup_key);
        if let Some(price) = existing.filter(|p| p.fingerprint == spec.fingerprint) {
            lines.push(SetupLine {
                object: "price",
                name: spec.lookup_key,
                action: SetupAction::Found,
                id: price.id.clone(),
            });
            continue;
        }
        let mut form = spec.form.clone();
        if existing.is_some() {
            form.push("transfer_lookup_key", "true");
        }
        let key = idempotency_key(&["tollgate-price", &spec.lookup_key, &spec.fingerprint]);
        let created = caller
            .post("/prices", &form, &key)
            .await
            .map_err(failed(format!("price {}", spec.lookup_key)))?;
        lines.push(SetupLine {
            object: "price",
            name: spec.lookup_key,
            action: if existing.is_some() {
                SetupAction::Changed
            } else {
                SetupAction::Created
            },
            id: created["id"].as_str().unwrap_or_default().to_owned(),
        });
    }
    Ok(lines)
}

/// Each plan's current price ids, fee first then meters, as `setup` left them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanPriceIds {
    pub plans: BTreeMap<String, Vec<String>>,
    /// Plans with a price missing or not matching the catalogue: `setup` has not run since
    /// the catalogue changed. Their tenants wait.
    pub not_set_up: BTreeMap<String, String>,
}

/// Looks up every plan's prices by lookup key. The meter ids are not needed to compare
/// (fingerprints leave them out), so any id stands in for them here.
pub async fn resolve(
    caller: &Caller,
    catalogue: &Catalogue,
    meters: &[MeterSettings],
) -> Result<PlanPriceIds, CallError> {
    let any_id: HashMap<String, String> = meters.iter().map(|m| (m.event_name.clone(), String::new())).collect();
    let mut specs = Vec::new();
    for (plan, prices) in &catalogue.plans {
        // Meters the catalogue prices are validated against `meters` at start.
        specs.extend(price_specs(plan, prices, meters, &any_id).unwrap_or_default());
    }
    let keys: Vec<String> = specs.iter().map(|s| s.lookup_key.clone()).collect();
    let found = find_prices(caller, &keys).await?;
    let mut out = PlanPriceIds::default();
    for spec in specs {
        match found.get(&spec.lookup_key) {
            Some(price) if price.fingerprint == spec.fingerprint => {
                out.plans.entry(spec.plan).or_default().push(price.id.clone());
            }
            other => {
                let why = if other.is_some() {
                    format!("price {} differs from the catalogue; run `setup`", spec.lookup_key)
                } else {
                    format!("price {} not found; run `setup`", spec.lookup_key)
                };
                out.not_set_up.entry(spec.plan).or_insert(why);
            }
        }
    }
    for plan in out.not_set_up.keys() {
        out.plans.remove(plan);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue(price: &str) -> Catalogue {
        Catalogue::parse(
            &format!(
                "[plans.starter]\ncurrency = \"usd\"\nmonthly_fee_minor = 2900\n\
                 meters.requests = {{ unit_price_minor = \"{price}\", included_units = 10 }}\n\
                 meters.compute_units = {{ unit_price_minor = \"0.002\" }}\n"
            ),
            "t",
        )
        .unwrap()
    }

    fn meters() -> Vec<MeterSettings> {
        ["requests", "compute_units"]
            .map(|m| MeterSettings {
                meter: m.to_owned(),
                event_name: format!("tollgate_{m}"),
            })
            .to_vec()
    }

    fn specs(price: &str, meter_id: &str) -> Vec<PriceSpec> {
        let ids = meters()
            .into_iter()
            .map(|m| (m.event_name, format!("{meter_id}_{}", m.meter)))
            .collect();
        let c = catalogue(price);
        price_specs("starter", &c.plans["starter"], &meters(), &ids).unwrap()
    }

    #[test]
    fn a_plan_has_a_fee_price_and_one_metered_price_per_meter() {
        let specs = specs("0.01", "mtr");
        let keys: Vec<&str> = specs.iter().map(|s| s.lookup_key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tollgate:starter:fee",
                "tollgate:starter:meter:compute_units",
                "tollgate:starter:meter:requests"
            ]
        );
        let field = |s: &PriceSpec, k: &str| s.form.0.iter().find(|(f, _)| f == k).map(|(_, v)| v.clone());
        assert_eq!(field(&specs[0], "unit_amount").as_deref(), Some("2900"));
        assert_eq!(
            field(&specs[1], "recurring[meter]").as_deref(),
            Some("mtr_compute_units")
        );
        assert_eq!(field(&specs[1], "unit_amount_decimal").as_deref(), Some("0.002"));
        assert_eq!(field(&specs[2], "tiers[0][up_to]").as_deref(), Some("10"));
        assert_eq!(
            field(&specs[2], "tiers[1][unit_amount_decimal]").as_deref(),
            Some("0.01")
        );
    }

    #[test]
    fn fingerprints_follow_the_amounts_not_the_meter_ids() {
        let (a, b, c) = (specs("0.01", "mtr"), specs("0.01", "other"), specs("0.02", "mtr"));
        assert_eq!(a[2].fingerprint, b[2].fingerprint);
        assert_ne!(a[2].fingerprint, c[2].fingerprint);
        assert_eq!(a[1].fingerprint, c[1].fingerprint, "other prices are unchanged");
    }
}

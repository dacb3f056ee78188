//! The catalogue's prices in ClickHouse, so that finance's `invoice_preview` and
//! `invoice_totals` views show amounts computed with the prices billing-sync invoices with.
//!
//! In: the [`Catalogue`] billing-sync loaded. Out: one snapshot in `plan_prices` (created by
//! meter-consumer's migrations, next to the views that read it): per plan a row with
//! `meter = ''` (currency, monthly fee) and a row per priced meter (unit price as
//! `Decimal(38, 12)`, included units), all under one `version`, which the views read as the
//! newest snapshot. Written at every start, so the views follow the catalogue file the
//! running service prices with; a snapshot equal to the last one changes no amount.

use clickhouse::Client;
use serde::Serialize;
use tollgate_runtime::catalogue::Catalogue;

pub const TABLE: &str = "plan_prices";

#[derive(Debug, thiserror::Error)]
#[error("{TABLE}: {error} (meter-consumer creates the table when it starts)")]
pub struct PricesError {
    // Not `source`: the message already says it, and `{:#}` would say it twice.
    error: clickhouse::error::Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, clickhouse::Row)]
pub struct PriceRow {
    pub plan: String,
    /// `''`: the plan's own row (currency, fee).
    pub meter: String,
    pub currency: String,
    /// Minor units · 10^12 (the column is `Decimal(38, 12)`, sent as its 128-bit integer).
    pub unit_price_minor: i128,
    pub included_units: i64,
    pub monthly_fee_minor: i64,
    pub version: u64,
}

/// The rows of one snapshot of `catalogue`, plans and meters in name order.
pub fn rows(catalogue: &Catalogue, version: u64) -> Vec<PriceRow> {
    let mut rows = Vec::new();
    for (plan, prices) in &catalogue.plans {
        let row = |meter: &str, unit_price_minor: i128, included_units: u64| PriceRow {
            plan: plan.clone(),
            meter: meter.to_owned(),
            currency: prices.currency.clone(),
            unit_price_minor,
            included_units: i64::try_from(included_units).unwrap_or(i64::MAX),
            monthly_fee_minor: i64::try_from(prices.monthly_fee_minor).unwrap_or(i64::MAX),
            version,
        };
        rows.push(row("", 0, 0));
        for (meter, price) in &prices.meters {
            rows.push(row(meter, price.unit_price_minor.scaled(), price.included_units));
        }
    }
    rows
}

/// Writes a snapshot of `catalogue` as one insert, so the views never see half of it.
pub async fn publish(client: &Client, catalogue: &Catalogue) -> Result<(), PricesError> {
    let version = crate::ledger::next_row_version();
    let mut insert = client
        .insert::<PriceRow>(TABLE)
        .await
        .map_err(|error| PricesError { error })?;
    for row in rows(catalogue, version) {
        insert.write(&row).await.map_err(|error| PricesError { error })?;
    }
    insert.end().await.map_err(|error| PricesError { error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_row_carries_the_fee_and_a_meter_row_the_exact_unit_price() {
        let catalogue = Catalogue::parse(
            "[plans.starter]\ncurrency = \"eur\"\nmonthly_fee_minor = 2900\n\
             meters.requests = { unit_price_minor = \"0.000000000001\", included_units = 10 }\n",
            "t",
        )
        .unwrap();
        let rows = rows(&catalogue, 7);
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].meter.as_str(), rows[0].monthly_fee_minor), ("", 2900));
        assert_eq!(
            (rows[1].meter.as_str(), rows[1].unit_price_minor, rows[1].included_units),
            ("requests", 1, 10)
        );
        assert!(rows.iter().all(|r| r.version == 7 && r.currency == "eur"));
    }
}

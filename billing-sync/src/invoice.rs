//! The invoice check of `reconcile`: per tenant, what Tollgate says the month costs (billable
//! units of the closed windows × the plan's prices, plus the fee) against Stripe's preview of
//! the tenant's upcoming invoice.
//!
//! In: `usage_events` (closed windows of the current month), `billing_customers` (each
//! tenant's plan, customer and subscription), the catalogue, and Stripe's
//! `POST /v1/invoices/create_preview` (<https://docs.stripe.com/api/invoices/create_preview>).
//! Out: one [`InvoiceLine`] per subscribed tenant; a difference fails `reconcile`.
//!
//! Metered prices bill the period just ending in arrears and the fee the next one in advance,
//! so the upcoming invoice holds this month's usage plus one fee: the same sum. Stripe's
//! `subtotal` is compared (before discounts and tax, which Tollgate does not model).
//! Subscriptions are anchored to the first of the month, so Stripe's period is the month.

use std::collections::BTreeMap;
use std::fmt;

use clickhouse::Client;
use tollgate_runtime::catalogue::Catalogue;

use crate::calls::{CallError, Caller};
use crate::customers::{self, CustomerStatus};
use crate::ledger::LedgerError;
use crate::stripe::Form;
use crate::usage::{self, UsageError};

#[derive(Debug, thiserror::Error)]
pub enum InvoiceError {
    #[error(transparent)]
    Record(#[from] LedgerError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("stripe invoice preview for tenant {tenant}: {error}")]
    Stripe { tenant: String, error: CallError },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceLine {
    pub tenant_id: String,
    pub plan: String,
    pub currency: String,
    /// Minor units.
    pub tollgate: i64,
    pub stripe: i64,
}

impl InvoiceLine {
    pub fn difference(&self) -> i64 {
        self.tollgate - self.stripe
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvoiceReport {
    pub lines: Vec<InvoiceLine>,
}

impl InvoiceReport {
    pub fn differs(&self) -> bool {
        self.lines.iter().any(|l| l.difference() != 0)
    }
}

/// Compares every active subscription's upcoming invoice with Tollgate's amount for the
/// units in `[from, to)` (the month's closed windows).
pub async fn compare(
    client: &Client,
    caller: &Caller,
    catalogue: &Catalogue,
    meters: &[String],
    from: u32,
    to: u32,
) -> Result<InvoiceReport, InvoiceError> {
    let mut units: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    if from < to {
        for u in usage::per_tenant(client, usage::Source::Raw, from, to, meters).await? {
            *units.entry(u.tenant_id).or_default().entry(u.meter).or_default() += u.units;
        }
    }
    let mut report = InvoiceReport::default();
    for record in customers::read_all(client).await? {
        if record.status != CustomerStatus::Active {
            continue;
        }
        let Some(prices) = catalogue.plans.get(&record.plan) else {
            continue;
        };
        let form = Form::new()
            .with("customer", record.stripe_customer_id.clone())
            .with("subscription", record.subscription_id.clone());
        // A preview creates nothing: no idempotency key is needed, but a POST carries one.
        let key = format!(
            "tollgate-invoice-preview:{}:{}",
            record.subscription_id,
            crate::sync::unix_now()
        );
        let preview = caller
            .post("/invoices/create_preview", &form, &key)
            .await
            .map_err(|error| InvoiceError::Stripe {
                tenant: record.tenant_id.clone(),
                error,
            })?;
        let stripe = preview["subtotal"]
            .as_i64()
            .or_else(|| preview["total"].as_i64())
            .unwrap_or(0);
        let tenant_units = units.remove(&record.tenant_id).unwrap_or_default();
        report.lines.push(InvoiceLine {
            tenant_id: record.tenant_id.clone(),
            plan: record.plan.clone(),
            currency: prices.currency.clone(),
            tollgate: prices.amount(&tenant_units),
            stripe,
        });
    }
    Ok(report)
}

impl fmt::Display for InvoiceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "tenant\tplan\tcurrency\ttollgate_minor\tstripe_minor\tdifference")?;
        for l in &self.lines {
            writeln!(
                f,
                "{}\t{}\t{}\t{}\t{}\t{}",
                l.tenant_id,
                l.plan,
                l.currency,
                l.tollgate,
                l.stripe,
                l.difference()
            )?;
        }
        let differing = self.lines.iter().filter(|l| l.difference() != 0).count();
        write!(f, "# {} invoices, {differing} differ", self.lines.len())
    }
}

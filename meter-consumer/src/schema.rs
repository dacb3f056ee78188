//! The ClickHouse schema meter-consumer writes and finance and billing-sync read, created and
//! migrated by the service itself at start.
//!
//! In: a client already pointed at the Tollgate database. Out: the tables and views below,
//! and one row per applied migration in `schema_migrations`.
//!
//! # Migrations
//! [`MIGRATIONS`] is an append-only list: a released migration is never edited, a change is a
//! new version. [`migrate`] reads the versions already recorded, runs each missing one
//! statement by statement, then records it.
//!
//! Two instances starting at once may both find a version missing and both run it. That is
//! safe because every statement is idempotent on its own (`CREATE ... IF NOT EXISTS`; a
//! future change must be too, e.g. `DROP VIEW IF EXISTS` then `CREATE VIEW IF NOT EXISTS`,
//! and a column addition checks `system.columns` first, since 18.16 has no
//! `ADD COLUMN IF NOT EXISTS`), and `schema_migrations` is a `ReplacingMergeTree` keyed by
//! version, so a version recorded twice is still one version. A `CREATE` racing another
//! `CREATE` of the same table can still fail with "already exists" (code 57): that is the
//! outcome we wanted, so it counts as success. No lock is needed, and none would survive a
//! crash of its holder anyway.
//!
//! Idempotent statements can still interleave badly. While one instance replaces a view
//! (version 4 drops `invoice_preview` and creates its new form), another still running version
//! 3 can create the old form in between; the first one's next statement, reading the new form,
//! fails. [`migrate`] then starts again from the versions recorded, a few times: it re-runs
//! the whole version, whose drop and create leave the new form, so the instances converge.
//!
//! # Compatibility
//! Every statement runs on Debian's ClickHouse 18.16 and on current releases: `DateTime`
//! (seconds) plus a millisecond column instead of `DateTime64`, `Nested` instead of `Map`, no
//! `LowCardinality`, `UInt8` flags instead of `Bool`, and the `PARTITION BY ... ORDER BY`
//! MergeTree syntax; every joined subquery has an alias (current releases refuse one
//! without), and views are dropped with `DROP TABLE` (18.16 has no `DROP VIEW`).
//! `tests/tests/clickhouse_sql.rs` runs every statement on 18.16 and `scripts/chdb-check`
//! replays them on the current release.
//!
//! Times are `DateTime('UTC')`: the month partition (`toYYYYMM`) and the hour and day
//! buckets are then UTC whatever the server's time zone, which is what lets the consumer cut
//! its batches at UTC month boundaries (an insert is atomic only within one partition).
//!
//! # Tables
//! - `usage_events`: one row per usage event, with the Kafka topic, partition and offset it
//!   came from. The highest offset stored per partition is where a consumer resumes.
//! - `usage_meter_minute`, `usage_meter_hour`, `usage_meter_day` (tenant × meter × bucket) and
//!   `usage_route_day` (tenant × route × day): rollups written by the consumer itself, one row
//!   per bucket per batch, each row carrying the batch's partition and last offset. Each table
//!   is therefore its own watermark, so a crash between the raw insert and a rollup insert
//!   neither skips nor double counts (see `crate::sink`). Read them with `sum()` (the views
//!   below do): a bucket has one row per batch that touched it.
//! - `usage_minutes_touched`: the minutes each batch touched, stamped like the rollups and
//!   with the server's insert time: how billing-sync finds the windows that changed.
//! - `consumers`: the keys topic's consumer records (`ReplacingMergeTree(version)`, read with
//!   `FINAL`); a deleted consumer is a row with `deleted = 1`.
//! - `key_audit`: one row per API key record seen on the keys topic: created, rolled,
//!   revoked, expired, updated or deleted, by whom, when. Never a secret or its hash.
//!
//! # Views for finance
//! `usage_daily`, `usage_hourly`, `usage_by_period` (calendar month, UTC), `route_usage_daily`,
//! `top_routes` (ten per tenant and period), `invoice_preview` (billable units per tenant,
//! meter and period with the tenant's Stripe customer id, plan and, priced from
//! `plan_prices`, the line's amount) and `invoice_totals` (per tenant and period: lines, fee,
//! total).
//!
//! `plan_prices` is created here, since the views read it, and written by billing-sync.

use std::borrow::Cow;

use clickhouse::Client;
use tollgate_runtime::clickhouse::OnCluster;

/// One schema version: statements run in order, each idempotent.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// Every migration, oldest first. Append only.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "usage events, rollups, consumers, key audit",
        statements: &[
            "CREATE TABLE IF NOT EXISTS usage_events (
                event_id String,
                time DateTime('UTC'),
                time_ms UInt16,
                tenant_id String,
                consumer String,
                key_id String,
                plan String,
                route String,
                method String,
                status UInt16,
                outcome String,
                billable UInt8,
                units Nested(meter String, value Int64),
                request_bytes Int64,
                response_bytes Int64,
                latency_ms Int64,
                upstream_latency_ms Int64,
                gateway_id String,
                request_id String,
                kafka_partition UInt32,
                kafka_offset UInt64,
                kafka_topic String,
                inserted_at DateTime('UTC') DEFAULT now()
            ) ENGINE = MergeTree PARTITION BY toYYYYMM(time) ORDER BY (tenant_id, time, event_id)",
            "CREATE TABLE IF NOT EXISTS usage_meter_minute (
                tenant_id String,
                meter String,
                minute DateTime('UTC'),
                events UInt64,
                billable_events UInt64,
                units Int64,
                billable_units Int64,
                kafka_topic String,
                kafka_partition UInt32,
                kafka_offset UInt64
            ) ENGINE = MergeTree PARTITION BY toYYYYMM(minute)
              ORDER BY (tenant_id, meter, minute, kafka_topic, kafka_partition, kafka_offset)",
            "CREATE TABLE IF NOT EXISTS usage_meter_hour (
                tenant_id String,
                meter String,
                hour DateTime('UTC'),
                events UInt64,
                billable_events UInt64,
                units Int64,
                billable_units Int64,
                kafka_topic String,
                kafka_partition UInt32,
                kafka_offset UInt64
            ) ENGINE = MergeTree PARTITION BY toYYYYMM(hour)
              ORDER BY (tenant_id, meter, hour, kafka_topic, kafka_partition, kafka_offset)",
            "CREATE TABLE IF NOT EXISTS usage_meter_day (
                tenant_id String,
                meter String,
                day Date,
                events UInt64,
                billable_events UInt64,
                units Int64,
                billable_units Int64,
                kafka_topic String,
                kafka_partition UInt32,
                kafka_offset UInt64
            ) ENGINE = MergeTree PARTITION BY toYYYYMM(day)
              ORDER BY (tenant_id, meter, day, kafka_topic, kafka_partition, kafka_offset)",
            "CREATE TABLE IF NOT EXISTS usage_route_day (
                tenant_id String,
                route String,
                day Date,
                events UInt64,
                billable_events UInt64,
                server_errors UInt64,
                rate_limited UInt64,
                request_bytes Int64,
                response_bytes Int64,
                latency_ms_sum Int64,
                kafka_topic String,
                kafka_partition UInt32,
                kafka_offset UInt64
            ) ENGINE = MergeTree PARTITION BY toYYYYMM(day)
              ORDER BY (tenant_id, day, route, kafka_topic, kafka_partition, kafka_offset)",
            "CREATE TABLE IF NOT EXISTS consumers (
                consumer_id String,
                name String,
                tenant_id String,
                plan String,
                stripe_customer_id String,
                metadata_json String,
                version Int64,
                updated_at DateTime('UTC'),
                deleted UInt8
            ) ENGINE = ReplacingMergeTree(version) ORDER BY consumer_id",
            "CREATE TABLE IF NOT EXISTS key_audit (
                key_id String,
                consumer_id String,
                consumer_name String,
                prefix String,
                action String,
                actor String,
                time DateTime('UTC'),
                time_ms UInt16,
                expires_at DateTime('UTC'),
                version Int64,
                kafka_partition UInt32,
                kafka_offset UInt64
            ) ENGINE = ReplacingMergeTree ORDER BY (key_id, kafka_partition, kafka_offset)",
        ],
    },
    Migration {
        version: 2,
        name: "finance views",
        statements: &[
            "CREATE VIEW IF NOT EXISTS usage_daily AS
             SELECT tenant_id, meter, day,
                    sum(events) AS events, sum(billable_events) AS billable_events,
                    sum(units) AS units, sum(billable_units) AS billable_units
             FROM usage_meter_day GROUP BY tenant_id, meter, day",
            "CREATE VIEW IF NOT EXISTS usage_hourly AS
             SELECT tenant_id, meter, hour,
                    sum(events) AS events, sum(billable_events) AS billable_events,
                    sum(units) AS units, sum(billable_units) AS billable_units
             FROM usage_meter_hour GROUP BY tenant_id, meter, hour",
            "CREATE VIEW IF NOT EXISTS usage_by_period AS
             SELECT tenant_id, meter, toStartOfMonth(day) AS period_start,
                    sum(events) AS events, sum(billable_events) AS billable_events,
                    sum(units) AS units, sum(billable_units) AS billable_units
             FROM usage_meter_day GROUP BY tenant_id, meter, period_start",
            // The average is computed outside: inside, `events` would name the alias.
            "CREATE VIEW IF NOT EXISTS route_usage_daily AS
             SELECT tenant_id, route, day, events, billable_events, server_errors, rate_limited,
                    request_bytes, response_bytes, latency_ms_sum / events AS avg_latency_ms
             FROM (
                 SELECT tenant_id, route, day,
                        sum(events) AS events, sum(billable_events) AS billable_events,
                        sum(server_errors) AS server_errors, sum(rate_limited) AS rate_limited,
                        sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes,
                        sum(latency_ms_sum) AS latency_ms_sum
                 FROM usage_route_day GROUP BY tenant_id, route, day
             )",
            "CREATE VIEW IF NOT EXISTS top_routes AS
             SELECT tenant_id, toStartOfMonth(day) AS period_start, route,
                    sum(events) AS events, sum(server_errors) AS server_errors,
                    sum(response_bytes) AS response_bytes
             FROM usage_route_day GROUP BY tenant_id, period_start, route
             ORDER BY tenant_id, period_start, events DESC
             LIMIT 10 BY tenant_id, period_start",
            INVOICE_PREVIEW_UNITS,
        ],
    },
    Migration {
        version: 3,
        name: "invoice_preview with aliased subqueries",
        // Servers that applied version 2 before its correction (18.16, which accepted the
        // unaliased join) hold the old view text; replace it. `DROP TABLE` because 18.16 has
        // no `DROP VIEW`. Two instances racing here may leave the view absent between one's
        // drop and its create, never absent after both finish.
        statements: &["DROP TABLE IF EXISTS invoice_preview", INVOICE_PREVIEW_UNITS],
    },
    Migration {
        version: 4,
        name: "plan prices, invoice amounts",
        // The view is replaced as in version 3; `plan_prices` first, since the new view
        // reads it.
        statements: &[
            PLAN_PRICES,
            "DROP TABLE IF EXISTS invoice_preview",
            INVOICE_PREVIEW,
            INVOICE_TOTALS,
        ],
    },
    Migration {
        version: 5,
        name: "minutes touched per batch",
        statements: &[MINUTES_TOUCHED, MINUTES_TOUCHED_SEED],
    },
];

/// The minutes each batch touched, one row per minute per batch, with the batch's partition
/// and last offset (its own watermark, like the rollups) and the server's insert time.
/// billing-sync reads the rows inserted since its last pass to find the windows that changed,
/// instead of summing the whole lookback every pass. Ordered by `inserted_at`, so that read
/// is an index range; partitioned by the minute's month, so a batch (one month) is one part.
const MINUTES_TOUCHED: &str = "CREATE TABLE IF NOT EXISTS usage_minutes_touched (
        minute DateTime('UTC'),
        kafka_topic String,
        kafka_partition UInt32,
        kafka_offset UInt64,
        inserted_at DateTime('UTC') DEFAULT now()
    ) ENGINE = MergeTree PARTITION BY toYYYYMM(minute) ORDER BY (inserted_at, minute)";

/// A new table under a partition already metered would hold no watermark, and send the
/// consumer back to the start of the partition: each (topic, partition) the raw table holds
/// gets one row at its raw watermark instead. Only partitions not yet in the table, so
/// running it again adds nothing.
const MINUTES_TOUCHED_SEED: &str =
    "INSERT INTO usage_minutes_touched (minute, kafka_topic, kafka_partition, kafka_offset)
     SELECT toStartOfMinute(max(time)), kafka_topic, kafka_partition, max(kafka_offset)
     FROM usage_events
     WHERE (kafka_topic, kafka_partition) NOT IN (SELECT kafka_topic, kafka_partition FROM usage_minutes_touched)
     GROUP BY kafka_topic, kafka_partition";

/// Billable units per tenant, meter and calendar month, with the tenant's Stripe customer id:
/// `invoice_preview` as migrations 2 and 3 made it (released text, kept as it was).
///
/// Both joined subqueries carry an alias: current ClickHouse refuses an unaliased subquery
/// in a `JOIN ... USING` (code 206, "no alias for subquery or table function"), 18.16
/// accepts either. Migration 2 first shipped without the aliases; no server that refuses
/// them could have recorded it, so it was corrected in place and migration 3 brings the
/// servers that recorded the old text up to date.
const INVOICE_PREVIEW_UNITS: &str = "CREATE VIEW IF NOT EXISTS invoice_preview AS
     SELECT tenant_id, period_start, meter, billable_units, billable_events, stripe_customer_id
     FROM (
         SELECT tenant_id, toStartOfMonth(day) AS period_start, meter,
                sum(billable_units) AS billable_units,
                sum(billable_events) AS billable_events
         FROM usage_meter_day WHERE tenant_id != ''
         GROUP BY tenant_id, period_start, meter
     ) AS billed ANY LEFT JOIN (
         SELECT tenant_id, anyIf(stripe_customer_id, stripe_customer_id != '') AS stripe_customer_id
         FROM consumers FINAL WHERE deleted = 0 GROUP BY tenant_id
     ) AS customers USING tenant_id";

/// The catalogue's prices, as the running billing-sync prices invoices (it writes a snapshot
/// of its catalogue at start, every row of one snapshot under one `version`). Per plan a row
/// with `meter = ''` holds the currency and the monthly fee; a row per priced meter holds
/// the unit price, exact to the catalogue's 12 decimal places (`Decimal(38, 12)`, which
/// 18.16 has), and the included units. A plan dropped from the catalogue keeps its old rows,
/// so readers take the newest snapshot only.
const PLAN_PRICES: &str = "CREATE TABLE IF NOT EXISTS plan_prices (
        plan String,
        meter String,
        currency String,
        unit_price_minor Decimal(38, 12),
        included_units Int64,
        monthly_fee_minor Int64,
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY (plan, meter)";

/// `invoice_preview` with amounts: billable units per tenant, meter and calendar month, the
/// tenant's Stripe customer id and plan (of its most recently updated live consumer, the
/// plan billing-sync subscribes it to), and the meter's line at the newest catalogue
/// snapshot: `(billable_units - included_units)` (never below 0) × `unit_price_minor`,
/// rounded half up to a whole minor unit, as Stripe rounds an invoice line and as
/// billing-sync's `PlanPrices::amount` does. `priced = 0` (currency `''`, amount 0): the
/// tenant's plan does not price the meter, or the tenant has no plan in the catalogue.
///
/// 18.16 allows one join per `SELECT`, hence the nesting. An unmatched `ANY LEFT JOIN` row
/// gets the column defaults, so an unpriced line's price is 0 and so is its amount.
const INVOICE_PREVIEW: &str = "CREATE VIEW IF NOT EXISTS invoice_preview AS
     SELECT tenant_id, period_start, meter, billable_units, billable_events, stripe_customer_id, plan,
            priced, currency, unit_price_minor, included_units,
            toInt64(greatest(billable_units - included_units, 0) * unit_price_minor + toDecimal128('0.5', 12))
                AS amount_minor
     FROM (
         SELECT tenant_id, period_start, meter, billable_units, billable_events, stripe_customer_id, plan
         FROM (
             SELECT tenant_id, toStartOfMonth(day) AS period_start, meter,
                    sum(billable_units) AS billable_units,
                    sum(billable_events) AS billable_events
             FROM usage_meter_day WHERE tenant_id != ''
             GROUP BY tenant_id, period_start, meter
         ) AS billed ANY LEFT JOIN (
             SELECT tenant_id, anyIf(stripe_customer_id, stripe_customer_id != '') AS stripe_customer_id,
                    argMax(plan, updated_at) AS plan
             FROM consumers FINAL WHERE deleted = 0 GROUP BY tenant_id
         ) AS customers USING tenant_id
     ) AS lines ANY LEFT JOIN (
         SELECT plan, meter, 1 AS priced, currency, unit_price_minor, included_units
         FROM plan_prices FINAL
         WHERE meter != '' AND version = (SELECT max(version) FROM plan_prices)
     ) AS prices USING plan, meter";

/// Per tenant and calendar month with usage: the sum of its `invoice_preview` lines, the
/// plan's monthly fee and their total, in the plan's currency's minor units; what
/// billing-sync's invoice check computes for the same units. `priced = 0` (fee and total 0
/// unless a line is priced): the tenant's plan is not in the catalogue.
const INVOICE_TOTALS: &str = "CREATE VIEW IF NOT EXISTS invoice_totals AS
     SELECT tenant_id, period_start, stripe_customer_id, plan, priced, currency,
            usage_minor, monthly_fee_minor, usage_minor + monthly_fee_minor AS total_minor
     FROM (
         SELECT tenant_id, period_start, any(stripe_customer_id) AS stripe_customer_id, any(plan) AS plan,
                sum(amount_minor) AS usage_minor
         FROM invoice_preview GROUP BY tenant_id, period_start
     ) AS tenant_usage ANY LEFT JOIN (
         SELECT plan, 1 AS priced, currency, monthly_fee_minor
         FROM plan_prices FINAL
         WHERE meter = '' AND version = (SELECT max(version) FROM plan_prices)
     ) AS fees USING plan";

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema_migrations: {0}")]
    Ledger(#[source] clickhouse::error::Error),
    #[error("migration {version} ({name}), statement {index}: {source}")]
    Statement {
        version: u32,
        name: &'static str,
        index: usize,
        #[source]
        source: clickhouse::error::Error,
    },
}

#[derive(Debug, serde::Serialize, clickhouse::Row)]
struct AppliedRow<'a> {
    version: u32,
    name: &'a str,
    applied_at: u32,
    applied_by: &'a str,
}

/// Brings the database of one server to the latest schema version. Idempotent; safe to run
/// from several instances at once (see the module docs).
pub async fn migrate(client: &Client) -> Result<(), SchemaError> {
    migrate_on(client, None).await
}

/// [`migrate`], on every replica of a cluster when `on_cluster` says so: each statement is
/// rewritten by [`OnCluster::rewrite`], and `schema_migrations` is replicated too, so a version
/// is applied once for the cluster and known to every replica.
pub async fn migrate_on(client: &Client, on_cluster: Option<OnCluster<'_>>) -> Result<(), SchemaError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match migrate_once(client, on_cluster).await {
            // A statement interleaved with another instance's migration, or (on replicas) a
            // quorum insert into `schema_migrations` refused while another instance's is
            // still being replicated (code 286): both settle by themselves.
            Err(err) if attempt < ATTEMPTS && (matches!(err, SchemaError::Statement { .. }) || quorum_busy(&err)) => {
                tracing::warn!(error = %err, attempt, "schema migration interleaved with another instance's; again");
                tokio::time::sleep(std::time::Duration::from_millis(200 * u64::from(attempt))).await;
                attempt += 1;
            }
            done => return done,
        }
    }
}

const SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
                version UInt32,
                name String,
                applied_at DateTime('UTC'),
                applied_by String
            ) ENGINE = ReplacingMergeTree ORDER BY version";

/// The tables and views the migrations create: what a view's body may name.
fn objects() -> Vec<&'static str> {
    let created = MIGRATIONS
        .iter()
        .flat_map(|m| m.statements.iter())
        .chain([&SCHEMA_MIGRATIONS]);
    created
        .filter_map(|s| {
            let rest = s
                .strip_prefix("CREATE TABLE IF NOT EXISTS ")
                .or_else(|| s.strip_prefix("CREATE VIEW IF NOT EXISTS "))?;
            rest.split(|c: char| c.is_whitespace() || c == '(').next()
        })
        .collect()
}

async fn migrate_once(client: &Client, on_cluster: Option<OnCluster<'_>>) -> Result<(), SchemaError> {
    let objects = objects();
    let statement = |sql: &'static str| match on_cluster {
        Some(cluster) => Cow::Owned(cluster.rewrite(sql, &objects)),
        None => Cow::Borrowed(sql),
    };
    client
        .query(&statement(SCHEMA_MIGRATIONS))
        .execute()
        .await
        .or_else(already_exists)
        .map_err(SchemaError::Ledger)?;
    let applied: Vec<u32> = client
        .query("SELECT DISTINCT version FROM schema_migrations")
        .fetch_all()
        .await
        .map_err(SchemaError::Ledger)?;
    let applied_by = format!("tollgate-meter-consumer {}", env!("CARGO_PKG_VERSION"));
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        for (index, sql) in migration.statements.iter().enumerate() {
            client
                .query(&statement(sql))
                .execute()
                .await
                .or_else(already_exists)
                .map_err(|source| SchemaError::Statement {
                    version: migration.version,
                    name: migration.name,
                    index,
                    source,
                })?;
        }
        let mut insert = client
            .insert::<AppliedRow<'_>>("schema_migrations")
            .await
            .map_err(SchemaError::Ledger)?;
        insert
            .write(&AppliedRow {
                version: migration.version,
                name: migration.name,
                applied_at: unix_now(),
                applied_by: &applied_by,
            })
            .await
            .map_err(SchemaError::Ledger)?;
        insert.end().await.map_err(SchemaError::Ledger)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "schema migration applied"
        );
    }
    Ok(())
}

fn quorum_busy(err: &SchemaError) -> bool {
    matches!(err, SchemaError::Ledger(clickhouse::error::Error::BadResponse(text)) if text.contains("Code: 286"))
}

/// The latest schema version this build knows.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// A `CREATE` that lost a race with an identical one (code 57, table already exists; 82,
/// database already exists) reached the state it asked for.
fn already_exists(err: clickhouse::error::Error) -> Result<(), clickhouse::error::Error> {
    match &err {
        clickhouse::error::Error::BadResponse(text) if text.contains("Code: 57") || text.contains("Code: 82") => Ok(()),
        _ => Err(err),
    }
}

fn unix_now() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_created_table_and_view_is_known_to_the_cluster_rewrite() {
        let objects = objects();
        for name in [
            "usage_events",
            "usage_meter_day",
            "invoice_preview",
            "plan_prices",
            "schema_migrations",
        ] {
            assert!(objects.contains(&name), "{name} in {objects:?}");
        }
        assert!(objects.iter().all(|o| !o.is_empty() && !o.contains(' ')), "{objects:?}");
    }

    #[test]
    fn versions_are_increasing_and_unique() {
        let versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert_eq!(latest_version(), *versions.last().unwrap());
    }

    #[test]
    fn every_statement_is_idempotent_and_avoids_newer_types() {
        for m in MIGRATIONS {
            for s in m.statements {
                let idempotent = s.contains("IF NOT EXISTS")
                    || s.starts_with("DROP TABLE IF EXISTS")
                    || (s.starts_with("INSERT INTO") && s.contains(" NOT IN (SELECT"));
                assert!(idempotent, "migration {}: {s}", m.version);
                for banned in ["DateTime64", "Map(", "LowCardinality", "Bool", "Date32"] {
                    assert!(!s.contains(banned), "migration {}: {banned} in {s}", m.version);
                }
            }
        }
    }
}

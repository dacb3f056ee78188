//! ClickHouse connection settings shared by meter-consumer and billing-sync.
//!
//! In: the `[clickhouse]` section and `TOLLGATE_CLICKHOUSE_PASSWORD`. Out: a `clickhouse`
//! client set up for both Debian's 18.16 and current servers, a ping that names the URL
//! when the server cannot be reached, and [`OnCluster`]: the services' schema statements,
//! written for one server, rewritten for every replica of a cluster.
//!
//! # On a cluster of replicas
//! With `cluster` set, the service talks to one replica (`url`) of a one-shard cluster whose
//! replicas coordinate through ZooKeeper. Its tables are `Replicated*MergeTree`, created on
//! every replica by one `ON CLUSTER` statement, so a migration runs once per cluster and its
//! record (a replicated row) is seen by every replica. Every insert waits until `replicas`
//! replicas hold it (`insert_quorum`), and every read runs with
//! `select_sequential_consistency`, which refuses rather than answers from a replica missing
//! a quorum insert: a watermark read on any replica is therefore never older than an
//! acknowledged write, which is what the exactly-once restart rule needs. While a replica is
//! down, inserts fail (too few live replicas) and are retried: metering waits, nothing is
//! lost or doubled. A retried insert whose first try did land is dropped by the replicated
//! block deduplication when its rows are the same block.

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
    /// The cluster (a `remote_servers` name, one shard) whose replicas hold the tables; unset
    /// on a single server. See the module docs.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Replicas an insert must reach before it is acknowledged, with `cluster`: all of them.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
}

fn default_replicas() -> u32 {
    2
}

fn default_database() -> String {
    "tollgate".to_owned()
}

fn default_user() -> String {
    "default".to_owned()
}

impl ClickhouseSettings {
    /// One server at `url`, as the `default` user.
    pub fn new(url: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: database.into(),
            user: default_user(),
            cluster: None,
            replicas: default_replicas(),
        }
    }

    pub fn validate(&self, section: &str) -> Result<(), Invalid> {
        http_url(&format!("{section}.url"), &self.url)?;
        if !is_identifier(&self.database) {
            return Err(Invalid::new(
                format!("{section}.database"),
                &self.database,
                "a name of letters, digits and `_`, not starting with a digit",
            ));
        }
        if let Some(cluster) = &self.cluster {
            if !is_identifier(cluster) {
                return Err(Invalid::new(
                    format!("{section}.cluster"),
                    cluster,
                    "a cluster name of letters, digits and `_` from the servers' remote_servers",
                ));
            }
            if self.replicas < 2 {
                return Err(Invalid::new(
                    format!("{section}.replicas"),
                    self.replicas.to_string(),
                    "at least 2: every replica of the cluster's one shard",
                ));
            }
        }
        Ok(())
    }

    /// How schema statements reach every replica, when the tables live on a cluster.
    pub fn on_cluster(&self) -> Option<OnCluster<'_>> {
        self.cluster.as_deref().map(|cluster| OnCluster {
            cluster,
            database: &self.database,
        })
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
        if self.cluster.is_some() {
            client = client
                .with_setting("insert_quorum", self.replicas.to_string())
                // A replica that dies mid-insert fails the insert after this, not after 10 min.
                .with_setting("insert_quorum_timeout", "30000")
                .with_setting("select_sequential_consistency", "1");
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
        let on_cluster = self
            .cluster
            .as_ref()
            .map_or(String::new(), |c| format!(" ON CLUSTER {c}"));
        server
            .query(&format!("CREATE DATABASE IF NOT EXISTS {}{on_cluster}", self.database))
            .execute()
            .await
            .map_err(unreachable)?;
        Ok(self.client())
    }
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// A schema statement written for one server, made to run once for every replica of
/// `cluster`: names qualified with `database` and `ON CLUSTER` added, `*MergeTree` engines
/// made `Replicated*MergeTree` under `/clickhouse/tables/{shard}/<database>/<table>`. Inside a
/// view, every table or view the caller names is qualified too: the other replicas run a
/// distributed statement in their default database, where an unqualified name means another
/// table. Any other statement runs on the replica the service talks to: an `INSERT ... SELECT`
/// seed's rows replicate, and so does a replicated table's `ALTER`.
#[derive(Debug, Clone, Copy)]
pub struct OnCluster<'a> {
    pub cluster: &'a str,
    pub database: &'a str,
}

impl OnCluster<'_> {
    pub fn rewrite(&self, statement: &str, objects: &[&str]) -> String {
        // No `ALTER TABLE`: a replicated table passes its own alters to every replica.
        const HEADS: [&str; 3] = [
            "CREATE TABLE IF NOT EXISTS ",
            "CREATE VIEW IF NOT EXISTS ",
            "DROP TABLE IF EXISTS ",
        ];
        let Some(head) = HEADS.iter().find(|h| statement.starts_with(*h)) else {
            return statement.to_owned();
        };
        let rest = &statement[head.len()..];
        let end = rest.find(|c: char| c.is_whitespace() || c == '(').unwrap_or(rest.len());
        let (name, body) = rest.split_at(end);
        let mut out = format!("{head}{}.{name} ON CLUSTER {}{body}", self.database, self.cluster);
        if head.starts_with("CREATE VIEW") {
            out = qualify(&out, self.database, objects);
        }
        self.replicated_engine(&out, name)
    }

    /// `ENGINE = XMergeTree[(args)]` as `ENGINE = ReplicatedXMergeTree('<path>', '{replica}'[, args])`.
    fn replicated_engine(&self, statement: &str, table: &str) -> String {
        const ENGINE: &str = "ENGINE = ";
        let Some(at) = statement.find(ENGINE) else {
            return statement.to_owned();
        };
        let after = &statement[at + ENGINE.len()..];
        let name_len = after.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(after.len());
        let engine = &after[..name_len];
        if !engine.ends_with("MergeTree") || engine.starts_with("Replicated") {
            return statement.to_owned();
        }
        let mut tail = &after[name_len..];
        let mut args = "";
        if let Some(inner) = tail.strip_prefix('(') {
            let close = inner.find(')').unwrap_or(inner.len());
            args = &inner[..close];
            tail = &inner[(close + 1).min(inner.len())..];
        }
        let args = if args.trim().is_empty() {
            String::new()
        } else {
            format!(", {args}")
        };
        format!(
            "{}{ENGINE}Replicated{engine}('/clickhouse/tables/{{shard}}/{}/{table}', '{{replica}}'{args}){tail}",
            &statement[..at],
            self.database
        )
    }
}

/// Every `FROM <object>` and `JOIN <object>` as `FROM <database>.<object>`.
fn qualify(sql: &str, database: &str, objects: &[&str]) -> String {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some((at, keyword)) = ["FROM ", "JOIN "]
        .iter()
        .filter_map(|k| rest.find(k).map(|at| (at, *k)))
        .min()
    {
        let after = &rest[at + keyword.len()..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        out.push_str(&rest[..at + keyword.len()]);
        if objects.contains(&&after[..len]) {
            out.push_str(database);
            out.push('.');
        }
        rest = after;
    }
    out.push_str(rest);
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    const ON: OnCluster<'static> = OnCluster {
        cluster: "tollgate",
        database: "tg",
    };

    #[test]
    fn a_table_is_created_replicated_on_every_replica() {
        let sql = "CREATE TABLE IF NOT EXISTS usage_events (a UInt8, time DateTime('UTC')) \
                   ENGINE = MergeTree PARTITION BY toYYYYMM(time) ORDER BY a";
        assert_eq!(
            ON.rewrite(sql, &[]),
            "CREATE TABLE IF NOT EXISTS tg.usage_events ON CLUSTER tollgate (a UInt8, time DateTime('UTC')) \
             ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/tg/usage_events', '{replica}') \
             PARTITION BY toYYYYMM(time) ORDER BY a"
        );
    }

    #[test]
    fn an_engine_keeps_its_arguments_after_the_replication_ones() {
        let sql = "CREATE TABLE IF NOT EXISTS consumers (v UInt64) ENGINE = ReplacingMergeTree(v) ORDER BY v";
        assert_eq!(
            ON.rewrite(sql, &[]),
            "CREATE TABLE IF NOT EXISTS tg.consumers ON CLUSTER tollgate (v UInt64) \
             ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/tg/consumers', '{replica}', v) ORDER BY v"
        );
        let bare = "CREATE TABLE IF NOT EXISTS m (v UInt32) ENGINE = ReplacingMergeTree ORDER BY v";
        assert!(ON.rewrite(bare, &[]).contains(
            "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/tg/m', '{replica}') ORDER BY v"
        ));
    }

    #[test]
    fn a_view_reads_the_named_objects_in_the_database_and_nothing_else_moves() {
        let sql = "CREATE VIEW IF NOT EXISTS totals AS SELECT a FROM (SELECT a FROM usage_day) AS d \
                   ANY LEFT JOIN plan_prices FINAL USING a WHERE x = (SELECT max(v) FROM plan_prices) \
                   AND y IN (SELECT y FROM system.numbers)";
        assert_eq!(
            ON.rewrite(sql, &["usage_day", "plan_prices", "totals"]),
            "CREATE VIEW IF NOT EXISTS tg.totals ON CLUSTER tollgate AS SELECT a FROM (SELECT a FROM tg.usage_day) AS d \
             ANY LEFT JOIN tg.plan_prices FINAL USING a WHERE x = (SELECT max(v) FROM tg.plan_prices) \
             AND y IN (SELECT y FROM system.numbers)"
        );
    }

    #[test]
    fn a_drop_runs_on_the_cluster_and_an_alter_or_a_seed_insert_runs_here() {
        assert_eq!(
            ON.rewrite("DROP TABLE IF EXISTS invoice_preview", &[]),
            "DROP TABLE IF EXISTS tg.invoice_preview ON CLUSTER tollgate"
        );
        let alter = "ALTER TABLE t ADD COLUMN c UInt8";
        assert_eq!(ON.rewrite(alter, &[]), alter);
        let seed = "INSERT INTO t (a) SELECT a FROM u WHERE a NOT IN (SELECT a FROM t)";
        assert_eq!(ON.rewrite(seed, &["t", "u"]), seed);
    }

    #[test]
    fn a_cluster_needs_a_plain_name_and_two_replicas() {
        let settings = |cluster: &str, replicas: u32| ClickhouseSettings {
            cluster: Some(cluster.to_owned()),
            replicas,
            ..ClickhouseSettings::new("http://127.0.0.1:8123", "tollgate")
        };
        assert!(settings("tollgate", 2).validate("clickhouse").is_ok());
        let err = settings("toll gate", 2).validate("clickhouse").unwrap_err().to_string();
        assert!(err.contains("clickhouse.cluster"), "{err}");
        let err = settings("tollgate", 1).validate("clickhouse").unwrap_err().to_string();
        assert!(err.contains("clickhouse.replicas"), "{err}");
    }
}

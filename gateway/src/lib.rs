//! The Tollgate gateway: tenants' requests in, proxied requests and usage events out.
//!
//! In: HTTP on the public listener; operators' calls on the admin listener; consumer, key and
//! budget records from the keys topic; month-to-date usage from ClickHouse when spend caps are
//! on. Out: proxied requests to the configured upstreams, health, readiness and metrics on the
//! admin listener.
#![forbid(unsafe_code)]

// Alphabetical (rustfmt); in the order a request flows: `server` (listeners) → `chain` (its
// steps; `routes`, `apikey`, `directory`, `spend` (caps), `limits`) → `events` (usage) and
// `metrics`; the admin side: `admin` → `keystore` (keys topic); `settings`, `problem` and `strict_json` serve all.
pub mod access_log;
pub mod admin;
pub mod apikey;
pub mod chain;
pub mod connections;
pub mod demo_upstream;
pub mod directory;
pub mod events;
pub mod keystore;
pub mod limits;
pub mod metrics;
pub mod problem;
pub mod routes;
pub mod server;
pub mod settings;
pub mod spend;
pub mod strict_json;
pub mod tls;

pub use server::{run, GatewayError};
pub use settings::GatewaySettings;

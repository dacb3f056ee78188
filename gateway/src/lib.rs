//! The Tollgate gateway: tenants' requests in, proxied requests and usage events out.
//!
//! In: HTTP on the public listener; operators' calls on the admin listener; consumer and key
//! records from the keys topic. Out: proxied requests to the configured upstreams, health,
//! readiness and metrics on the admin listener.
#![forbid(unsafe_code)]

pub mod admin;
pub mod apikey;
pub mod demo_upstream;
pub mod directory;
pub mod events;
pub mod keystore;
pub mod limits;
pub mod problem;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod settings;

pub use server::{run, GatewayError};
pub use settings::GatewaySettings;

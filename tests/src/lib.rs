//! Helpers for the end-to-end tests that know Tollgate's services: gateways in-process, an
//! HTTP client and a counting upstream. What needs no service (server addresses, unique
//! names, topics, polling) lives in `tollgate-test-support` and is re-exported here.
#![forbid(unsafe_code)]

pub mod billing;
pub mod capped;
pub mod gateway;
pub mod http;
pub mod portal;
pub mod process;
pub mod stripe_proxy;
pub mod stripe_state;
pub mod webhook_receiver;

pub use tollgate_test_support::*;

//! Connection hygiene on a listener: caps on open connections (global and per client IP) and
//! the deadline from accept to the first complete request head.
//!
//! In: accepted sockets and their peers; the `http.*` connection settings. Out: a
//! [`ConnectionPermit`] held for a connection's life, or a refusal (the socket is closed at
//! once); counts of both in `gateway_connections_refused_total{reason}` and
//! `gateway_connections_closed_total{reason}`.
//!
//! Why: a socket that never sends a request (nor a full h2 preface) costs a file descriptor
//! for ever unless someone closes it; a few thousand exhaust the process. hyper's
//! `header_read_timeout` starts only once HTTP/1 parsing has begun, after the auto builder's
//! version sniffing, so the first-request deadline is enforced here for both versions.
//! Later requests on a kept-alive HTTP/1 connection have `http.header_read_timeout_ms` each;
//! HTTP/2 connections are pinged every `http.h2_keep_alive_interval_ms` and closed when a ping
//! goes unanswered.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::metrics::GatewayMetrics;

/// Open connections, by client IP, under two caps.
pub struct ConnectionTable {
    max_total: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    metrics: Arc<GatewayMetrics>,
}

/// One open connection; dropping it frees its place.
pub struct ConnectionPermit {
    table: Arc<ConnectionTable>,
    ip: IpAddr,
}

impl ConnectionTable {
    pub fn new(max_total: usize, max_per_ip: usize, metrics: Arc<GatewayMetrics>) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_ip,
            open: Mutex::default(),
            metrics,
        })
    }

    /// A place for a new connection from `ip`, or `None` (counted) when a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionPermit> {
        let mut open = self.open.lock().expect("connection table lock");
        if open.0 >= self.max_total {
            drop(open);
            self.metrics.count("gateway_connections_refused_total", "global_cap");
            return None;
        }
        let per_ip = open.1.get(&ip).copied().unwrap_or(0);
        if per_ip >= self.max_per_ip {
            drop(open);
            self.metrics.count("gateway_connections_refused_total", "ip_cap");
            return None;
        }
        open.0 += 1;
        open.1.insert(ip, per_ip + 1);
        Some(ConnectionPermit {
            table: Arc::clone(self),
            ip,
        })
    }

    /// Connections open now (for tests).
    pub fn open(&self) -> usize {
        self.open.lock().expect("connection table lock").0
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("connection table lock");
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_per_ip_and_overall_and_places_come_back() {
        let table = ConnectionTable::new(3, 2, Arc::new(GatewayMetrics::noop()));
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        let b: IpAddr = "203.0.113.2".parse().unwrap();
        let a1 = table.admit(a).unwrap();
        let _a2 = table.admit(a).unwrap();
        assert!(table.admit(a).is_none(), "per-IP cap");
        let _b1 = table.admit(b).unwrap();
        assert!(table.admit(b).is_none(), "global cap");
        drop(a1);
        assert_eq!(table.open(), 2);
        assert!(table.admit(a).is_some(), "a closed connection frees its place");
    }
}

//! Connection hygiene on a listener: caps on open connections (global and per client IP), the
//! deadline from accept to the first complete request head, and the idle timeout after it.
//!
//! In: accepted sockets and their peers; the `http.*` connection settings; each request's
//! start and end on a connection ([`Activity`]). Out: a [`ConnectionPermit`] held for a
//! connection's life, or a refusal (the socket is closed at once); the watchdog's verdict
//! on an open connection ([`Activity::idle_check`]); counts in
//! `gateway_connections_refused_total{reason}` and `gateway_connections_closed_total{reason}`.
//!
//! Why: a socket that never sends a request (nor a full h2 preface) costs a file descriptor
//! for ever unless someone closes it; a few thousand exhaust the process. hyper's
//! `header_read_timeout` starts only once HTTP/1 parsing has begun, after the auto builder's
//! version sniffing, so the first-request deadline is enforced here for both versions.
//! Later requests on a kept-alive HTTP/1 connection have `http.header_read_timeout_ms` each;
//! HTTP/2 connections are pinged every `http.h2_keep_alive_interval_ms` and closed when a ping
//! goes unanswered. Pings keep a dead peer from holding a socket, not an idle one: a client
//! that answers pings but sends no request is closed by `http.idle_timeout_ms`, which counts
//! time with no request in flight, whatever bytes the connection carries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A connection's requests, as its watchdog sees them: whether one ever arrived, how many are
/// in flight (until their response head is ready), and when the last one started or ended.
///
/// A response still streaming after its head counts as idle time; that is harmless because
/// the watchdog only shuts down gracefully, which lets a response in progress finish.
pub struct Activity {
    epoch: Instant,
    any: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` of the last start or end.
    last_change_ms: AtomicU64,
}

/// What the watchdog does next with an open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not idle long enough: look again after this long.
    Wait(Duration),
    /// No request in flight for the whole idle timeout.
    Close,
}

/// A request in flight on a connection; dropping it (the response head is ready, or the
/// client went away) ends it.
pub struct InFlight(Arc<Activity>);

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            any: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
        })
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.any.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
        InFlight(Arc::clone(self))
    }

    /// Whether any request has arrived on the connection.
    pub fn any_request(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether the connection has had no request in flight for `idle` as of `now`, or how long
    /// to wait before asking again.
    pub fn idle_check(&self, idle: Duration, now: Instant) -> Verdict {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Verdict::Wait(idle);
        }
        let last = self.epoch + Duration::from_millis(self.last_change_ms.load(Ordering::Acquire));
        let quiet = now.saturating_duration_since(last);
        if quiet >= idle {
            Verdict::Close
        } else {
            Verdict::Wait(idle - quiet)
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_change_ms.fetch_max(ms, Ordering::AcqRel);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_idle_only_after_the_whole_timeout_with_nothing_in_flight() {
        let idle = Duration::from_millis(500);
        let activity = Activity::new();
        assert!(!activity.any_request());
        let request = activity.begin();
        assert!(activity.any_request());
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            activity.idle_check(idle, later),
            Verdict::Wait(idle),
            "a request in flight is never idle"
        );
        drop(request);
        let ended = Instant::now();
        match activity.idle_check(idle, ended) {
            Verdict::Wait(left) => assert!(left <= idle && left > Duration::from_millis(400), "{left:?}"),
            Verdict::Close => panic!("closed right after a request ended"),
        }
        assert_eq!(
            activity.idle_check(idle, ended + idle + Duration::from_millis(5)),
            Verdict::Close
        );
        let _again = activity.begin();
        assert_eq!(activity.idle_check(idle, later), Verdict::Wait(idle));
    }

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

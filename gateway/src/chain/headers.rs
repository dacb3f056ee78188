//! Chain steps: header hygiene, on the way in and on the way to the upstream.
//!
//! In: the client's header block and the peer address. Out: a refusal for what cannot be
//! forwarded faithfully (431 too large, 501 a transfer coding other than `chunked`, 400 a
//! header name with `_` under `forwarding.underscores_in_headers = "refuse"`); and the header
//! block the upstream gets.
//!
//! Header names are compared normalised (lower-case, `_` as `-`), because CGI, WSGI, PHP and
//! many nginx setups merge `X_Tollgate_Tenant` into `X-Tollgate-Tenant`. Client headers whose
//! name holds `_` are dropped by default (nginx's `underscores_in_headers off`). Every
//! `x-tollgate-*` header, the credential headers and the identity list
//! (`identity.strip_headers`) are removed in that normalised form; the gateway then sets its
//! own identity headers. Forwarding headers (`forwarded`, `x-forwarded-*`, `x-real-ip`) are
//! kept only from peers in `forwarding.trusted_proxies` (and extended); from anyone else they
//! are dropped and the gateway sets its own. `x-forwarded-host` is set only when
//! `forwarding.forward_host` is on. `Content-Length` is the gateway's own (the body was read).

use std::net::{IpAddr, SocketAddr};

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::StatusCode;

use super::forward::remove_hop_by_hop;
use super::{set_header, Proxy, RequestContext};
use crate::directory::Identity;
use crate::problem::Problem;
use crate::settings::UnderscoreHeaders;

/// Forwarding headers: trusted only from configured proxies.
const FORWARDING: [&str; 9] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-real-ip",
    "x-client-ip",
];

/// A header name as a lenient server would read it: lower-case, `_` as `-`.
pub fn normalised(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

impl Proxy {
    /// Refuses header blocks that cannot be forwarded as checked.
    pub(super) fn check_request_headers(&self, headers: &HeaderMap) -> Result<(), Problem> {
        let header_bytes: usize = headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        if header_bytes > self.settings.http.max_header_bytes {
            return Err(Problem::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
                "Request Header Fields Too Large",
            )
            .with_detail(format!(
                "request headers are limited to {} bytes",
                self.settings.http.max_header_bytes
            )));
        }
        // RFC 9112 section 6.1: a coding the server does not understand is a 501. The body is
        // read and forwarded as plain bytes, so only `chunked` (undone by hyper) is understood.
        for value in headers.get_all(hyper::header::TRANSFER_ENCODING) {
            let codings = value.to_str().unwrap_or("?");
            if codings.split(',').any(|c| !c.trim().eq_ignore_ascii_case("chunked")) {
                self.metrics.count("gateway_headers_refused_total", "transfer-coding");
                return Err(
                    Problem::new(StatusCode::NOT_IMPLEMENTED, "transfer-coding", "Not Implemented")
                        .with_detail("only the chunked transfer coding is accepted"),
                );
            }
        }
        if self.settings.forwarding.underscores_in_headers == UnderscoreHeaders::Refuse
            && headers.keys().any(|n| n.as_str().contains('_'))
        {
            self.metrics.count("gateway_headers_refused_total", "underscore");
            return Err(
                Problem::new(StatusCode::BAD_REQUEST, "underscore-in-header", "Bad Request")
                    .with_detail("header names may not contain `_`"),
            );
        }
        Ok(())
    }

    /// The header block the upstream gets.
    pub(super) fn upstream_headers(
        &self,
        incoming: &HeaderMap,
        peer: SocketAddr,
        identity: &Identity,
        ctx: &RequestContext,
        body_len: usize,
    ) -> HeaderMap {
        let trusted = self.trusted_proxy(peer.ip());
        let mut headers = HeaderMap::with_capacity(incoming.len() + 8);
        for (name, value) in incoming {
            let norm = normalised(name.as_str());
            let drop = name.as_str().contains('_')
                || norm.starts_with("x-tollgate-")
                || self.strip_headers.contains(&norm)
                || self.credential_headers.iter().any(|c| c.as_str() == norm)
                || norm == "host"
                || norm == "content-length"
                || (!trusted && FORWARDING.contains(&norm.as_str()));
            if drop {
                if name.as_str().contains('_') {
                    self.metrics.count("gateway_headers_dropped_total", "underscore");
                }
                continue;
            }
            headers.append(name.clone(), value.clone());
        }
        remove_hop_by_hop(&mut headers);
        if body_len > 0 || incoming.contains_key(hyper::header::CONTENT_LENGTH) {
            headers.insert(hyper::header::CONTENT_LENGTH, HeaderValue::from(body_len));
        }

        let consumer = &identity.consumer;
        set_header(&mut headers, "x-tollgate-consumer", &consumer.name);
        set_header(&mut headers, "x-tollgate-tenant", &consumer.tenant_id);
        set_header(&mut headers, "x-tollgate-key-id", &identity.key_id);
        set_header(
            &mut headers,
            "x-tollgate-plan",
            self.plan_of(identity).unwrap_or_default(),
        );
        set_header(&mut headers, "x-request-id", &ctx.request_id);

        // Forwarding: extend what a trusted proxy said, or start afresh.
        let proto = if ctx.over_tls { "https" } else { "http" };
        let peer_ip = peer.ip().to_string();
        let forwarded_for = match incoming.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) if trusted => format!("{earlier}, {peer_ip}"),
            _ => peer_ip.clone(),
        };
        set_header(&mut headers, "x-forwarded-for", &forwarded_for);
        let node = match peer.ip() {
            IpAddr::V6(_) => format!("\"[{peer_ip}]\""),
            IpAddr::V4(_) => peer_ip.clone(),
        };
        let forwarded = match incoming.get("forwarded").and_then(|v| v.to_str().ok()) {
            Some(earlier) if trusted => format!("{earlier}, for={node}"),
            _ => format!("for={node};proto={proto}"),
        };
        set_header(&mut headers, "forwarded", &forwarded);
        if !trusted {
            set_header(&mut headers, "x-forwarded-proto", proto);
            set_header(&mut headers, "x-real-ip", &peer_ip);
        }
        if self.settings.forwarding.forward_host && !(trusted && incoming.contains_key("x-forwarded-host")) {
            if let Some(host) = incoming.get(hyper::header::HOST) {
                headers.insert("x-forwarded-host", host.clone());
            }
        }
        headers
    }

    fn trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(ip))
    }
}

/// An address block, `10.0.0.0/8` or `2001:db8::/32` (a bare address is one host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr.parse::<IpAddr>().ok()?, prefix.parse::<u8>().ok()?),
            None => {
                let addr = text.parse::<IpAddr>().ok()?;
                (addr, if addr.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { network: addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), self.prefix, 32) == masked(u32::from(a).into(), self.prefix, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), self.prefix, 128) == masked(u128::from(a), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// The configured identity list, normalised once.
pub(super) fn normalised_names(list: &[String]) -> Vec<String> {
    list.iter().map(|n| normalised(n)).collect()
}

pub(super) fn header_names(list: &[String]) -> Vec<HeaderName> {
    list.iter()
        .map(|h| HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).expect("validated header name"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compare_with_underscores_as_dashes_in_any_case() {
        assert_eq!(normalised("X_Tollgate_Tenant"), "x-tollgate-tenant");
        assert_eq!(normalised("X-CONSUMER-USERNAME"), "x-consumer-username");
    }

    #[test]
    fn cidrs_contain_their_addresses_only() {
        let net = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let host = Cidr::parse("::1").unwrap();
        assert!(host.contains("::1".parse().unwrap()));
        assert!(!host.contains("::2".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("203.0.113.9".parse().unwrap()));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "::/129", ""] {
            assert!(Cidr::parse(bad).is_none(), "{bad}");
        }
    }
}

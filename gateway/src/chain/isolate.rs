//! Chain step: tenant isolation.
//!
//! In: the route's `{tenantId}` value, the request's query (and, on routes with
//! `check_body_tenant`, its form or JSON body), and the authenticated identity. Out: nothing,
//! or 403 when the request names another tenant than the key's. Identity comes only from the
//! key; the path, query and body may only repeat it.
//!
//! The tenant parameter (`identity.tenant_query_param`) is recognised in every spelling a
//! framework might merge into it: names are compared after percent-decoding, lower-casing,
//! dropping `[...]` suffixes (PHP, Rails arrays) and removing `_`, `.`, `-` and spaces
//! (`tenant_id`, `Tenant-Id`, `tenant.id`, `tenantId`, `tenant_id[]` are one name). Pairs are
//! split on `&` and `;` (both are separators to some servers). Every occurrence must equal
//! the key's tenant: a server may read the first, the last or all of them.

use std::collections::BTreeMap;

use hyper::{Request, StatusCode};

use super::{Proxy, RequestBody};
use crate::directory::Identity;
use crate::problem::Problem;

impl Proxy {
    pub(super) fn isolate(
        &self,
        req: &Request<RequestBody>,
        params: &BTreeMap<String, String>,
        identity: &Identity,
    ) -> Result<(), Problem> {
        let tenant = &identity.consumer.tenant_id;
        if params.get("tenantId").is_some_and(|t| t != tenant) {
            return Err(forbidden("the tenant in the path is not the key's tenant"));
        }
        if let Some(param) = &self.settings.identity.tenant_query_param {
            let wanted = normalise_name(param);
            if form_pairs(req.uri().query().unwrap_or_default().as_bytes())
                .any(|(name, value)| normalise_name(&name) == wanted && value != *tenant)
            {
                return Err(forbidden("the tenant in the query is not the key's tenant"));
            }
        }
        Ok(())
    }

    /// On routes with `check_body_tenant`: the tenant parameter in a form or JSON body.
    pub(super) fn isolate_body(
        &self,
        headers: &hyper::HeaderMap,
        body: &[u8],
        identity: &Identity,
        check: bool,
    ) -> Result<(), Problem> {
        let Some(param) = self.settings.identity.tenant_query_param.as_ref().filter(|_| check) else {
            return Ok(());
        };
        let wanted = normalise_name(param);
        let tenant = &identity.consumer.tenant_id;
        let media = headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let mismatch = if media == "application/x-www-form-urlencoded" {
            form_pairs(body).any(|(name, value)| normalise_name(&name) == wanted && value != *tenant)
        } else if media == "application/json" || media.ends_with("+json") {
            match crate::strict_json::top_level_members(body) {
                Ok(Some(members)) => members
                    .iter()
                    .any(|(name, value)| normalise_name(name) == wanted && value.as_str() != Some(tenant.as_str())),
                Ok(None) => false,
                Err(_) => {
                    return Err(Problem::new(StatusCode::BAD_REQUEST, "invalid-json", "Bad Request")
                        .with_detail("the JSON body is malformed or repeats a member name"))
                }
            }
        } else {
            false
        };
        if mismatch {
            return Err(forbidden("the tenant in the body is not the key's tenant"));
        }
        Ok(())
    }
}

/// `name=value` pairs of a query or form body, split on `&` and `;`, percent-decoded with `+`
/// as space (lossy: a name that is not UTF-8 cannot be the tenant parameter's).
pub(super) fn form_pairs(text: &[u8]) -> impl Iterator<Item = (String, String)> + '_ {
    text.split(|b| *b == b'&' || *b == b';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = match pair.iter().position(|b| *b == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &[][..]),
            };
            (form_decode(name), form_decode(value))
        })
}

fn form_decode(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).and_then(|b| hex(*b)),
            bytes.get(i + 2).and_then(|b| hex(*b)),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parameter name as any framework might read it: lower-case, `[...]` suffixes dropped,
/// without `_`, `.`, `-` or whitespace.
pub(super) fn normalise_name(name: &str) -> String {
    let base = name.split('[').next().unwrap_or_default();
    base.chars()
        .filter(|c| !matches!(c, '_' | '.' | '-' | ']') && !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect()
}

pub(super) fn forbidden(detail: &str) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "tenant-mismatch", "Forbidden").with_detail(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_split_on_both_separators_and_decode() {
        let pairs: Vec<_> = form_pairs(b"tenant_id=t%5F1&a=b;tenant_id=t+2&&flag").collect();
        assert_eq!(
            pairs,
            [
                ("tenant_id".into(), "t_1".into()),
                ("a".into(), "b".into()),
                ("tenant_id".into(), "t 2".into()),
                ("flag".into(), String::new())
            ]
        );
    }

    #[test]
    fn every_spelling_of_the_parameter_is_one_name() {
        let wanted = normalise_name("tenant_id");
        for spelling in [
            "tenant_id",
            "TENANT_ID",
            "Tenant-Id",
            "tenant.id",
            "tenant id",
            "tenantId",
            "tenant_id[]",
            "tenant_id[0]",
            "tenant_id[x][y]",
            " tenant_id",
        ] {
            assert_eq!(normalise_name(spelling), wanted, "{spelling}");
        }
        assert_ne!(normalise_name("tenant"), wanted);
        assert_ne!(normalise_name("tenant_ids"), wanted);
    }
}

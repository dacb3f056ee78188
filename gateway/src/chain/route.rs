//! Chain steps: the canonical path, then routing.
//!
//! In: the request's head. Out: the canonical path (what is matched and what is forwarded)
//! and the [`Matched`] route with its `{param}` values, recorded in the context (the route id
//! goes in the usage event); or a 400/404/405/431 refusal. The 400 names the reason, never the
//! path. Only configured
//! upstreams are ever reached: the gateway is never an open proxy.

use hyper::{Request, StatusCode};

use super::canonical::{canonicalize, CanonicalPath, PathRefusal};
use super::{Proxy, RequestBody, RequestContext};
use crate::problem::Problem;
use crate::routes::{EscapedSlashes, Matched, Miss, NonAscii};

impl Proxy {
    /// The canonical path, the route serving it, and the route's path policies applied.
    /// Routes `req` as a request of `method` when given (a preflight's), else of its own.
    pub(super) fn route(
        &self,
        req: &Request<RequestBody>,
        method: Option<&str>,
        ctx: &mut RequestContext,
    ) -> Result<(CanonicalPath, Matched), Problem> {
        let path = canonicalize(req.uri().path()).map_err(|why| self.path_refused(why))?;
        let matched = self
            .routes
            .find(method.unwrap_or(req.method().as_str()), &path.segments)
            .map_err(miss_problem)?;
        ctx.route = Some(std::sync::Arc::clone(&matched.route));
        let settings = &matched.route.settings;
        if path.escaped_slash && settings.escaped_slashes == EscapedSlashes::Refuse {
            return Err(self.path_refused(PathRefusal::EncodedSlash));
        }
        if path.non_ascii && settings.non_ascii == NonAscii::Refuse {
            return Err(self.path_refused(PathRefusal::NonAscii));
        }
        Ok((path, matched))
    }

    fn path_refused(&self, why: PathRefusal) -> Problem {
        self.metrics.count("gateway_paths_refused_total", why.slug());
        Problem::new(StatusCode::BAD_REQUEST, why.slug(), "Bad Request").with_detail(why.to_string())
    }
}

fn miss_problem(miss: Miss) -> Problem {
    match miss {
        Miss::NoRoute => {
            Problem::new(StatusCode::NOT_FOUND, "no-route", "Not Found").with_detail("no route serves this path")
        }
        Miss::MethodNotAllowed => Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method Not Allowed",
        ),
    }
}

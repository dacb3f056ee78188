//! The admin API's operations as data: the router resolves every request through this table,
//! and `GET /openapi.json` is generated from it, so no operation is served undocumented and
//! none documented that is not served.
//!
//! In: a method and a path. Out: the operation and its path parameters, or a 404 / 405
//! problem; and the OpenAPI 3.1 document, whose schemas come from the request and answer
//! types themselves ([`tollgate_runtime::admin_api`] and the bodies in this module's parent).

use std::sync::LazyLock;

use hyper::{Method, StatusCode};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref, RefOr, Required,
    ResponseBuilder, Schema,
};
use utoipa::{PartialSchema, ToSchema};

use tollgate_runtime::admin_api as api;

use crate::problem::Problem;

/// What the router dispatches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Op {
    OpenApi,
    CreateConsumer,
    ListConsumers,
    GetConsumer,
    PatchConsumer,
    DeleteConsumer,
    CreateKey,
    ListKeys,
    RollKeys,
    RevokeKey,
    RollKey,
    Limits,
    MintPortalSession,
    ExchangePortalSession,
    PutBudget,
    GetBudget,
    DeleteBudget,
}

/// A JSON body's schema: its component name and how to collect it and what it refers to.
#[derive(Clone, Copy)]
struct Shape {
    name: fn() -> std::borrow::Cow<'static, str>,
    collect: fn(&mut Vec<(String, RefOr<Schema>)>),
}

fn shape<T: ToSchema>() -> Shape {
    Shape {
        name: T::name,
        collect: |all| {
            all.push((T::name().into_owned(), T::schema()));
            T::schemas(all);
        },
    }
}

struct Operation {
    op: Op,
    method: Method,
    /// With `{name}` segments for path parameters.
    path: &'static str,
    summary: &'static str,
    request: Option<Shape>,
    /// The success answer: its status and body (`None`: no body).
    success: (StatusCode, &'static str, Option<Shape>),
    /// Refusals beyond the ones every operation of its kind has (see [`refusals`]).
    refusals: &'static [(StatusCode, &'static str)],
}

fn table() -> Vec<Operation> {
    use Op::*;
    let op = |op, method, path, summary, request, success, refusals| Operation {
        op,
        method,
        path,
        summary,
        request,
        success,
        refusals,
    };
    let created = |what, body| (StatusCode::CREATED, what, Some(body));
    let ok = |what, body| (StatusCode::OK, what, Some(body));
    let gone = (
        StatusCode::NO_CONTENT,
        "done (also when there was nothing to remove)",
        None,
    );
    let consumer = shape::<api::Consumer>();
    let key = shape::<api::ApiKey>();
    let budget = shape::<api::Budget>();
    let exists: &[_] = &[(StatusCode::CONFLICT, "a consumer of that name exists")];
    vec![
        op(
            OpenApi,
            Method::GET,
            "/openapi.json",
            "This document",
            None,
            (StatusCode::OK, "the OpenAPI 3.1 document", None),
            &[],
        ),
        op(
            CreateConsumer,
            Method::POST,
            "/v1/consumers",
            "Create a consumer",
            Some(shape::<super::NewConsumer>()),
            created("the consumer", consumer),
            exists,
        ),
        op(
            ListConsumers,
            Method::GET,
            "/v1/consumers",
            "List consumers",
            None,
            ok("every consumer", shape::<api::ConsumerList>()),
            &[],
        ),
        op(
            GetConsumer,
            Method::GET,
            "/v1/consumers/{name}",
            "Read a consumer",
            None,
            ok("the consumer", consumer),
            &[],
        ),
        op(
            PatchConsumer,
            Method::PATCH,
            "/v1/consumers/{name}",
            "Change a consumer's metadata (JSON merge patch: null removes a member)",
            Some(shape::<super::ConsumerPatch>()),
            ok("the consumer as changed", consumer),
            &[],
        ),
        op(
            DeleteConsumer,
            Method::DELETE,
            "/v1/consumers/{name}",
            "Delete a consumer and its keys",
            None,
            gone,
            &[],
        ),
        op(
            CreateKey,
            Method::POST,
            "/v1/consumers/{name}/keys",
            "Issue a key; the answer is the only place it is ever shown",
            Some(shape::<super::NewKeyBody>()),
            created("the key, with `key`", key),
            &[],
        ),
        op(
            ListKeys,
            Method::GET,
            "/v1/consumers/{name}/keys",
            "List a consumer's keys (never their secrets)",
            None,
            ok("the keys", shape::<api::KeyList>()),
            &[],
        ),
        op(
            RollKeys,
            Method::POST,
            "/v1/consumers/{name}/roll-key",
            "Issue a new key and let every active one expire at `expiresOn`",
            Some(shape::<super::RollBody>()),
            created("the new key, with `key`", key),
            &[],
        ),
        op(
            RevokeKey,
            Method::DELETE,
            "/v1/consumers/{name}/keys/{id}",
            "Revoke a key at once",
            None,
            gone,
            &[],
        ),
        op(
            RollKey,
            Method::POST,
            "/v1/consumers/{name}/keys/{id}/roll",
            "Replace one key; the old one works until `expiresOn`",
            Some(shape::<super::portal::RollOneBody>()),
            created("the new key, with `key`", key),
            &[],
        ),
        op(
            Limits,
            Method::GET,
            "/v1/consumers/{name}/limits",
            "Where the consumer's tenant stands against each limit, without charging",
            None,
            ok("the limit status", shape::<api::LimitStatus>()),
            &[],
        ),
        op(
            MintPortalSession,
            Method::POST,
            "/v1/consumers/{name}/portal-sessions",
            "Mint a one-time portal sign-in link",
            Some(shape::<super::portal::MintBody>()),
            created("the link", shape::<api::PortalLink>()),
            &[(StatusCode::CONFLICT, "this gateway has no [portal] section")],
        ),
        op(
            ExchangePortalSession,
            Method::POST,
            "/v1/portal-sessions/exchange",
            "Redeem a portal link's token (once)",
            Some(shape::<super::portal::ExchangeBody>()),
            ok("who the link signs in", shape::<api::PortalSession>()),
            &[
                (StatusCode::GONE, "the link was used, expired, or its consumer is gone"),
                (StatusCode::CONFLICT, "this gateway has no [portal] section"),
            ],
        ),
        op(
            PutBudget,
            Method::PUT,
            "/v1/consumers/{name}/budget",
            "Set the tenant's monthly spend cap",
            Some(shape::<super::budget::BudgetBody>()),
            ok("the budget", budget),
            &[],
        ),
        op(
            GetBudget,
            Method::GET,
            "/v1/consumers/{name}/budget",
            "Read the tenant's budget and month-to-date spend",
            None,
            ok("the budget", budget),
            &[],
        ),
        op(
            DeleteBudget,
            Method::DELETE,
            "/v1/consumers/{name}/budget",
            "Remove the tenant's budget",
            None,
            gone,
            &[],
        ),
    ]
}

static OPERATIONS: LazyLock<Vec<Operation>> = LazyLock::new(table);

/// The operation a request names, with its path parameters in the order the path has them.
/// A path some operation has with another method is 405 (with `Allow`), any other 404.
pub(super) fn resolve<'p>(method: &Method, path: &'p str) -> Result<(Op, Vec<&'p str>), Problem> {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut allowed = Vec::new();
    for operation in OPERATIONS.iter() {
        let Some(params) = matches(operation.path, &segments) else {
            continue;
        };
        if operation.method == method {
            return Ok((operation.op, params));
        }
        allowed.push(operation.method.as_str());
    }
    if allowed.is_empty() {
        return Err(Problem::new(StatusCode::NOT_FOUND, "not-found", "Not Found"));
    }
    Err(Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method Not Allowed",
    )
    .with_detail(format!("{path} answers {}", allowed.join(", ")))
    .with_header("allow", allowed.join(", ")))
}

fn matches<'p>(template: &str, segments: &[&'p str]) -> Option<Vec<&'p str>> {
    let parts: Vec<&str> = template.split('/').skip(1).collect();
    if parts.len() != segments.len() {
        return None;
    }
    let mut params = Vec::new();
    for (part, segment) in parts.iter().zip(segments) {
        if part.starts_with('{') {
            if segment.is_empty() {
                return None;
            }
            params.push(*segment);
        } else if part != segment {
            return None;
        }
    }
    Some(params)
}

/// The OpenAPI 3.1 document of the admin API, generated from the table.
pub(super) fn document() -> OpenApi {
    let mut schemas = Vec::new();
    (shape::<api::Problem>().collect)(&mut schemas);
    let mut paths = PathsBuilder::new();
    for operation in OPERATIONS.iter() {
        let mut built = OperationBuilder::new()
            .operation_id(Some(operation_id(operation.op)))
            .summary(Some(operation.summary));
        for name in operation
            .path
            .split('/')
            .filter_map(|p| p.strip_prefix('{')?.strip_suffix('}'))
        {
            built = built.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(String::schema())),
            );
        }
        if let Some(request) = operation.request {
            (request.collect)(&mut schemas);
            built = built.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(Required::True))
                    .content("application/json", json_content(request))
                    .build(),
            ));
        }
        let (status, what, body) = operation.success;
        let mut success = ResponseBuilder::new().description(what);
        if let Some(body) = body {
            (body.collect)(&mut schemas);
            success = success.content("application/json", json_content(body));
        } else if operation.op == Op::OpenApi {
            success = success.content("application/json", ContentBuilder::new().build());
        }
        built = built.response(status.as_str(), success.build());
        for (status, why) in refusals(operation) {
            built = built.response(
                status.as_str(),
                ResponseBuilder::new()
                    .description(why)
                    .content(
                        "application/problem+json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(api::Problem::name())))
                            .build(),
                    )
                    .build(),
            );
        }
        if operation.op == Op::OpenApi {
            // Readable without the token: it holds no data, and tools fetch it bare.
            built = built.securities(Some([SecurityRequirement::default()]));
        }
        paths = paths.path(
            operation.path,
            utoipa::openapi::PathItem::new(http_method(&operation.method), built.build()),
        );
    }
    let mut components =
        ComponentsBuilder::new().security_scheme("adminToken", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    schemas.sort_by(|a, b| a.0.cmp(&b.0));
    schemas.dedup_by(|a, b| a.0 == b.0);
    for (name, schema) in schemas {
        components = components.schema(name, schema);
    }
    let mut paths = paths.build();
    // Several methods on one path arrive as separate items: merge them into one.
    let mut merged = utoipa::openapi::Paths::new();
    for (path, item) in std::mem::take(&mut paths.paths) {
        merged.paths.entry(path).or_default().merge_operations(item);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Tollgate admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Consumers, their API keys, their tenants' budgets and limit status, and portal \
                     session links. Every call but this document's needs `Authorization: Bearer \
                     <TOLLGATE_ADMIN_TOKEN>`; every refusal is an RFC 9457 problem.",
                ))
                .build(),
        )
        .paths(merged)
        .components(Some(components.build()))
        .security(Some([SecurityRequirement::new("adminToken", Vec::<String>::new())]))
        .build()
}

fn json_content(shape: Shape) -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name((shape.name)())))
        .build()
}

/// The refusals an operation can answer: every one can be unauthorized; one with a body can
/// refuse it (400, 413, 415); one naming a consumer can find none (404); a write can fail to
/// be stored (503).
fn refusals(operation: &Operation) -> Vec<(StatusCode, &'static str)> {
    if operation.op == Op::OpenApi {
        return Vec::new();
    }
    let mut all = vec![(StatusCode::UNAUTHORIZED, "no or a wrong admin token")];
    if operation.request.is_some() {
        all.push((StatusCode::BAD_REQUEST, "the body or a value in it is not acceptable"));
        all.push((StatusCode::PAYLOAD_TOO_LARGE, "the body is over 64 KiB"));
        all.push((StatusCode::UNSUPPORTED_MEDIA_TYPE, "the body is not sent as JSON"));
    }
    if operation.path.contains('{') {
        all.push((StatusCode::NOT_FOUND, "no such consumer (or key)"));
    }
    if operation.method != Method::GET {
        all.push((
            StatusCode::SERVICE_UNAVAILABLE,
            "the change could not be stored; retry later",
        ));
    }
    all.extend_from_slice(operation.refusals);
    all
}

fn operation_id(op: Op) -> String {
    let name = format!("{op:?}");
    let mut id = String::with_capacity(name.len());
    for (i, c) in name.chars().enumerate() {
        id.push(if i == 0 { c.to_ascii_lowercase() } else { c });
    }
    id
}

fn http_method(method: &Method) -> HttpMethod {
    match *method {
        Method::POST => HttpMethod::Post,
        Method::PUT => HttpMethod::Put,
        Method::PATCH => HttpMethod::Patch,
        Method::DELETE => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_listed_once_and_resolves_to_itself() {
        let mut seen = std::collections::HashSet::new();
        for operation in OPERATIONS.iter() {
            assert!(seen.insert(operation.op), "{:?} listed twice", operation.op);
            let path = operation.path.replace("{name}", "acme").replace("{id}", "key_1");
            let (op, params) = resolve(&operation.method, &path).expect("resolves");
            assert_eq!(op, operation.op, "{} {}", operation.method, operation.path);
            assert_eq!(params.len(), operation.path.matches('{').count());
        }
    }

    #[test]
    fn unknown_paths_are_404_and_known_paths_with_another_method_405() {
        let missing = resolve(&Method::GET, "/v1/nothing").unwrap_err();
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        let wrong = resolve(&Method::PUT, "/v1/consumers/acme/keys").unwrap_err();
        assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(
            wrong.headers.iter().any(|(n, v)| *n == "allow" && v == "POST, GET"),
            "{:?}",
            wrong.headers
        );
        // An empty parameter is no consumer name.
        assert_eq!(
            resolve(&Method::GET, "/v1/consumers//keys").unwrap_err().status,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn the_document_refers_only_to_schemas_it_defines() {
        let doc = serde_json::to_value(document()).expect("serializes");
        let defined = doc["components"]["schemas"].as_object().expect("schemas");
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(defined.contains_key(name), "{name} is referred to but not defined");
        }
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["paths"]["/v1/consumers/{name}/budget"].as_object().unwrap().len(),
            3,
            "PUT, GET and DELETE share the path item"
        );
    }
}

//! What the services send to ClickHouse, recorded on the wire, and the SQL their sources hold.
//!
//! In: HTTP requests from the services' own ClickHouse clients, pointed at [`Recorder::url`]
//! instead of the server; the services' source files. Out: every request forwarded unchanged
//! to the real ClickHouse (answers passed back unchanged), and, in arrival order, each
//! statement's SQL text as the server received it (binds already applied), its database and
//! its settings; and every SQL string literal of the sources, to check none went unsent.
//!
//! Recording on the wire rather than reading `system.query_log` afterwards: 18.16's log is
//! off unless `log_queries` is set, has no database column, orders rows only to the second
//! (a migration's `DROP` and `CREATE` would tie), and would mix in every other test's queries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// One statement as ClickHouse received it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sent {
    pub sql: String,
    /// The `database` parameter: where unqualified names resolve.
    pub database: Option<String>,
    /// Settings passed as URL parameters (`max_insert_block_size`, ...), minus the ones
    /// that only frame the HTTP exchange.
    pub settings: BTreeMap<String, String>,
    /// The server's HTTP status: 200 when 18.16 accepted the statement.
    pub status: u16,
}

/// URL parameters that frame the exchange rather than configure the statement.
const FRAMING: &[&str] = &[
    "query",
    "database",
    "default_format",
    "compress",
    "decompress",
    "query_id",
    "user",
    "password",
];

struct State {
    upstream: HttpClient<HttpConnector, Full<Bytes>>,
    target: String,
    sent: Mutex<Vec<Sent>>,
}

/// A recording proxy in front of a real ClickHouse server.
pub struct Recorder {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Recorder {
    /// Listens on a free loopback port and forwards to `target` (`http://host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind recorder");
        let addr = listener.local_addr().expect("recorder address");
        let state = Arc::new(State {
            upstream: HttpClient::builder(TokioExecutor::new()).build_http(),
            target: target.trim_end_matches('/').to_owned(),
            sent: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { forward(req, &state).await }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything recorded so far, in arrival order.
    pub fn sent(&self) -> Vec<Sent> {
        self.state.sent.lock().unwrap().clone()
    }
}

async fn forward(req: Request<Incoming>, state: &State) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let params = parse_query(parts.uri.query().unwrap_or_default());
    // An INSERT names itself in `query` and streams its rows (RowBinary, maybe compressed) in
    // the body; any other statement is the body.
    let sql = match params.get("query") {
        Some(query) => query.clone(),
        None => String::from_utf8_lossy(&body).into_owned(),
    };
    let mut upstream = Request::builder().method(parts.method).uri(format!(
        "{}{}",
        state.target,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    ));
    for (name, value) in &parts.headers {
        if name != hyper::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let answer = state
        .upstream
        .request(upstream.body(Full::new(body)).expect("forwarded request"))
        .await;
    let (status, response) = match answer {
        Ok(answer) => {
            let (parts, body) = answer.into_parts();
            let body = body.collect().await?.to_bytes();
            (parts.status.as_u16(), Response::from_parts(parts, Full::new(body)))
        }
        Err(err) => {
            let mut response = Response::new(Full::new(Bytes::from(format!("recorder: upstream: {err}"))));
            *response.status_mut() = hyper::StatusCode::BAD_GATEWAY;
            (502, response)
        }
    };
    state.sent.lock().unwrap().push(Sent {
        sql,
        database: params.get("database").cloned(),
        settings: params
            .into_iter()
            .filter(|(name, _)| !FRAMING.contains(&name.as_str()))
            .collect(),
        status,
    });
    Ok(response)
}

/// `a=b&c=d` form decoding (`+` is a space, `%XX` a byte).
fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(name), form_decode(value))
        })
        .collect()
}

fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|d| d as u8)
}

// ---------------------------------------------------------------------------------------
// SQL in the sources.

/// A string literal of a service's source that is a SQL statement (or a piece of one).
#[derive(Debug, Clone)]
pub struct Literal {
    pub file: String,
    /// The literal's value, whitespace collapsed.
    pub text: String,
}

impl Literal {
    /// Holds `{...}` (a `format!` argument): only the code can say what goes there.
    pub fn is_template(&self) -> bool {
        self.text.contains('{')
    }

    /// Whether some recorded statement is this literal with its placeholders filled: `?`
    /// (a bind, or the client's `?fields`) and `{...}` match anything.
    pub fn sent_in(&self, sent: &[Sent]) -> bool {
        let chunks = placeholder_split(&self.text);
        sent.iter().any(|s| matches_chunks(&collapse(&s.sql), &chunks))
    }
}

const SQL_VERBS: &[&str] = &[
    "SELECT", "INSERT", "CREATE", "ALTER", "DROP", "KILL", "SYSTEM", "OPTIMIZE", "TRUNCATE", "RENAME", "WITH",
];

/// Every SQL literal in the `.rs` files under `dirs` (recursively).
pub fn sql_literals(dirs: &[&Path]) -> Vec<Literal> {
    let mut files = Vec::new();
    for dir in dirs {
        collect_rs(dir, &mut files);
    }
    files.sort();
    let mut literals = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).expect("read source");
        // Unit tests sit at the end of a file; their strings are not what the service sends.
        let source = source.split("#[cfg(test)]").next().unwrap_or_default();
        for text in string_literals(source) {
            let text = collapse(&text);
            let verb = text.split([' ', '(']).next().unwrap_or_default();
            if SQL_VERBS.contains(&verb) && text.len() > verb.len() {
                literals.push(Literal {
                    file: file.display().to_string(),
                    text,
                });
            }
        }
    }
    literals
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The values of the `"..."` and `r#"..."#` literals of Rust source, skipping comments and
/// char literals. Enough Rust for the services' sources, not a full lexer.
fn string_literals(source: &str) -> Vec<String> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '\'' => {
                // A char literal ('x', '\n', '\'') or a lifetime ('a).
                if chars.get(i + 1) == Some(&'\\') {
                    i += 2;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                } else if chars.get(i + 2) == Some(&'\'') {
                    i += 2;
                }
            }
            'r' if matches!(chars.get(i + 1), Some('"' | '#')) && !is_ident(chars.get(i.wrapping_sub(1))) => {
                let mut j = i + 1;
                let mut hashes = 0;
                while chars.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if chars.get(j) == Some(&'"') {
                    let start = j + 1;
                    let closing: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
                    let rest: String = chars[start..].iter().collect();
                    let len = rest.find(&closing).unwrap_or(rest.len());
                    out.push(rest[..len].to_owned());
                    i = start + rest[..len].chars().count() + closing.chars().count() - 1;
                }
            }
            '"' => {
                let mut value = String::new();
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                        match chars.get(i) {
                            Some('\n') => {
                                while chars.get(i + 1).is_some_and(|c| c.is_whitespace()) {
                                    i += 1;
                                }
                            }
                            Some('n') => value.push('\n'),
                            Some('t') => value.push('\t'),
                            Some(&c) => value.push(c),
                            None => {}
                        }
                    } else {
                        value.push(chars[i]);
                    }
                    i += 1;
                }
                out.push(value);
            }
            _ => {}
        }
        i += 1;
    }
    out
}

fn is_ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// Runs of whitespace as one space, trimmed.
pub fn collapse(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The fixed pieces between placeholders (`?`, `{...}`).
fn placeholder_split(text: &str) -> Vec<String> {
    let mut chunks = vec![String::new()];
    let mut in_braces = false;
    for c in text.chars() {
        match c {
            '{' => {
                in_braces = true;
                chunks.push(String::new());
            }
            '}' if in_braces => in_braces = false,
            _ if in_braces => {}
            '?' => chunks.push(String::new()),
            c => chunks.last_mut().expect("one chunk at least").push(c),
        }
    }
    chunks.into_iter().filter(|c| !c.trim().is_empty()).collect()
}

/// Whether the chunks occur in `text` in order (placeholders between them match anything).
fn matches_chunks(text: &str, chunks: &[String]) -> bool {
    let mut from = 0;
    for chunk in chunks {
        // Collapsing may have eaten the space a placeholder stood beside.
        let chunk = chunk.trim();
        match text[from..].find(chunk) {
            Some(at) => from += at + chunk.len(),
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("INSERT+INTO+t%28a%2Cb%29"), "INSERT INTO t(a,b)");
        assert_eq!(form_decode("100%"), "100%");
    }
}

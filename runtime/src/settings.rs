//! Settings: a TOML file, overlaid by `TOLLGATE_*` environment variables, into a service's
//! serde struct.
//!
//! In: the file named by `--config` and the process environment. Out: the typed settings, or
//! one [`SettingsError`] line that names the file or variable, the setting, what was found and
//! what is allowed.
//!
//! Overlay rule: `TOLLGATE_<SECTION>__<FIELD>` (double underscore between path segments, single
//! underscores kept) sets `<section>.<field>`. Every setting lives in a section, so a variable
//! without `__` is never an overlay: those are secrets and script variables, read by name
//! (`TOLLGATE_ADMIN_TOKEN`). A value is read as a TOML value when it parses as one (`8080`,
//! `true`, `["a", "b"]`) and as a plain string otherwise, or when the setting wants a string.
//! An overlay naming a setting the service does not have is an error, like a typo in the file.
//!
//! The `[log]` section is every service's (`crate::logging`): it is read here, not by the
//! service's struct, and returned beside it by [`load_with_log`].

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::logging::{self, LogSettings};

/// Prefix of every Tollgate environment variable.
pub const ENV_PREFIX: &str = "TOLLGATE_";
/// Separates path segments in an overlay variable's name.
pub const ENV_SEPARATOR: &str = "__";

/// Why settings could not be loaded. One line, context first.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{path}: cannot read: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{origin}: not valid TOML: {message}")]
    Syntax { origin: String, message: String },
    #[error("{var}: {message}")]
    Overlay { var: String, message: String },
    #[error("{origin}: {}{message}", setting_prefix(field))]
    Field {
        origin: String,
        field: String,
        message: String,
    },
    #[error("{origin}: {invalid}")]
    Invalid { origin: String, invalid: Invalid },
}

/// The deserializer's message on one line, without its own `in `table`` note (the setting's
/// path is given already).
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !(l.starts_with("in `") && l.ends_with('`')))
        .collect::<Vec<_>>()
        .join("; ")
}

fn setting_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("setting `{field}`: ")
    }
}

/// A value that parsed but is not allowed; returned by a service's `validate()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted path of the setting, e.g. `public.listen`.
    pub field: String,
    /// What was found, as the user wrote it.
    pub found: String,
    /// What is allowed instead.
    pub expected: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, found: impl fmt::Display, expected: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            found: found.to_string(),
            expected: expected.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "setting `{}`: found {:?}, expected {}",
            self.field, self.found, self.expected
        )
    }
}

impl std::error::Error for Invalid {}

/// Something a settings struct checks about itself after parsing, without any IO.
pub trait Validate {
    fn validate(&self) -> Result<(), Invalid>;
}

/// A service's settings and the `[log]` section every service shares (see [`crate::logging`]).
#[derive(Debug)]
pub struct Loaded<T> {
    pub settings: T,
    pub log: LogSettings,
}

/// Loads `path`, overlays the process environment, deserializes and validates.
pub fn load<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, SettingsError> {
    load_with_log(path).map(|loaded| loaded.settings)
}

/// [`load`], also returning the `[log]` section.
pub fn load_with_log<T: DeserializeOwned + Validate>(path: &Path) -> Result<Loaded<T>, SettingsError> {
    let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    from_str_with_env_and_log(&text, &path.display().to_string(), std::env::vars())
}

/// [`load`] on text already read, with an explicit environment (tests pass their own).
pub fn from_str_with_env<T: DeserializeOwned + Validate>(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, SettingsError> {
    from_str_with_env_and_log(text, origin, env).map(|loaded| loaded.settings)
}

/// [`load_with_log`] on text already read, with an explicit environment.
pub fn from_str_with_env_and_log<T: DeserializeOwned + Validate>(
    text: &str,
    origin: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Loaded<T>, SettingsError> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| SettingsError::Syntax {
        origin: origin.to_owned(),
        message: e.message().to_owned(),
    })?;
    let mut overlays: Vec<Overlay> = env.into_iter().filter_map(Overlay::from_var).collect();
    // Sorted so that the result never depends on the environment's order.
    overlays.sort_by(|a, b| a.var.cmp(&b.var));
    for overlay in &overlays {
        overlay.apply(&mut table, overlay.typed_value())?;
    }
    // `[log]` belongs to no service's struct: every service has it, read here once.
    let log = log_settings(&mut table, origin, &overlays)?;
    let settings: T = loop {
        match serde_path_to_error::deserialize(toml::Value::Table(table.clone())) {
            Ok(settings) => break settings,
            Err(err) => {
                let field = err.path().to_string();
                let message = one_line(&err.inner().to_string());
                let culprit = overlays
                    .iter_mut()
                    .find(|o| o.path.join(".") == field || o.names_unknown_field(&field, &message));
                match culprit {
                    // The value looked like a number or bool but the setting is a string (a
                    // numeric token, say): take it as written, once.
                    Some(overlay) if !overlay.as_string && message.starts_with("invalid type") => {
                        overlay.as_string = true;
                        overlay.apply(&mut table, toml::Value::String(overlay.raw.clone()))?;
                    }
                    Some(overlay) => {
                        return Err(SettingsError::Field {
                            origin: overlay.var.clone(),
                            field: overlay.path.join("."),
                            message,
                        })
                    }
                    None => {
                        return Err(SettingsError::Field {
                            origin: origin.to_owned(),
                            field: if field == "." { String::new() } else { field },
                            message,
                        })
                    }
                }
            }
        }
    };
    settings.validate().map_err(|invalid| SettingsError::Invalid {
        origin: origin_of(&overlays, &invalid.field).unwrap_or_else(|| origin.to_owned()),
        invalid,
    })?;
    Ok(Loaded { settings, log })
}

/// Takes the `[log]` section out of `table` and reads it (its defaults when absent).
fn log_settings(table: &mut toml::Table, origin: &str, overlays: &[Overlay]) -> Result<LogSettings, SettingsError> {
    let Some(section) = table.remove(logging::SECTION) else {
        return Ok(LogSettings::default());
    };
    serde_path_to_error::deserialize(section).map_err(|err| {
        let inner = err.path().to_string();
        let field = if inner == "." {
            logging::SECTION.to_owned()
        } else {
            format!("{}.{inner}", logging::SECTION)
        };
        let culprit = overlays
            .iter()
            .find(|o| o.path.first().is_some_and(|p| p == logging::SECTION));
        SettingsError::Field {
            origin: culprit.map_or(origin, |o| o.var.as_str()).to_owned(),
            field,
            message: one_line(&err.inner().to_string()),
        }
    })
}

/// The overlay variable that set `field`, if one did.
fn origin_of(overlays: &[Overlay], field: &str) -> Option<String> {
    overlays
        .iter()
        .find(|o| field == o.path.join(".") || field.starts_with(&format!("{}.", o.path.join("."))))
        .map(|o| o.var.clone())
}

struct Overlay {
    var: String,
    path: Vec<String>,
    raw: String,
    as_string: bool,
}

impl Overlay {
    fn from_var((var, raw): (String, String)) -> Option<Self> {
        let rest = var.strip_prefix(ENV_PREFIX)?;
        if !rest.contains(ENV_SEPARATOR) {
            return None;
        }
        let path = rest.split(ENV_SEPARATOR).map(str::to_ascii_lowercase).collect();
        Some(Self {
            var,
            path,
            raw,
            as_string: false,
        })
    }

    fn typed_value(&self) -> toml::Value {
        format!("v = {}", self.raw)
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(self.raw.clone()))
    }

    /// serde reports an unknown field at the path of the table holding it, or at the field's
    /// own path; the unknown key may be any segment of the overlay's path.
    fn names_unknown_field(&self, field: &str, message: &str) -> bool {
        (0..self.path.len()).any(|i| {
            let parent = if i == 0 {
                ".".to_owned()
            } else {
                self.path[..i].join(".")
            };
            (field == parent || field == self.path[..=i].join("."))
                && message.contains(&format!("unknown field `{}`", self.path[i]))
        })
    }

    fn apply(&self, table: &mut toml::Table, value: toml::Value) -> Result<(), SettingsError> {
        if self.path.iter().any(String::is_empty) {
            return Err(SettingsError::Overlay {
                var: self.var.clone(),
                message: "empty path segment (use `__` only between names)".to_owned(),
            });
        }
        let (last, parents) = self.path.split_last().expect("an overlay has two or more segments");
        let not_a_table = |depth: usize| SettingsError::Overlay {
            var: self.var.clone(),
            message: format!(
                "`{}` is not a table of settings; set it in the file",
                self.path[..=depth].join(".")
            ),
        };
        let mut here = table;
        let mut depth = 0;
        while depth < parents.len() {
            let entry = here
                .entry(parents[depth].clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            // An array of tables (`[[routes]]`) is entered by index: `TOLLGATE_ROUTES__0__UPSTREAM`.
            let entry = match entry {
                toml::Value::Array(items) => {
                    let len = items.len();
                    let index = parents.get(depth + 1).and_then(|i| i.parse::<usize>().ok());
                    match index.and_then(|i| items.get_mut(i)) {
                        Some(item) => {
                            depth += 1;
                            item
                        }
                        None => {
                            return Err(SettingsError::Overlay {
                                var: self.var.clone(),
                                message: format!(
                                    "`{}` is a list of {len} entries: name one by its index, from 0",
                                    parents[depth]
                                ),
                            })
                        }
                    }
                }
                other => other,
            };
            here = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(not_a_table(depth)),
            };
            depth += 1;
        }
        here.insert(last.clone(), value);
        Ok(())
    }
}

/// Parses `host:port` (an IP address, not a name: listeners bind what they are told).
pub fn socket_addr(field: &str, value: &str) -> Result<std::net::SocketAddr, Invalid> {
    value
        .parse()
        .map_err(|_| Invalid::new(field, value, "an address like 127.0.0.1:8080"))
}

/// Parses an absolute `http://` or `https://` URL.
pub fn http_url(field: &str, value: &str) -> Result<hyper::Uri, Invalid> {
    let expected = "an absolute http:// or https:// URL";
    let uri: hyper::Uri = value.parse().map_err(|_| Invalid::new(field, value, expected))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => Ok(uri),
        _ => Err(Invalid::new(field, value, expected)),
    }
}

/// Checks that a duration or count is within `[min, max]`.
pub fn in_range(field: &str, value: u64, min: u64, max: u64) -> Result<u64, Invalid> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Invalid::new(field, value, format!("a number from {min} to {max}")))
    }
}

#[cfg(test)]
mod tests;

//! The gateway's settings file, as far as billing-sync must agree with it: the meters it
//! counts. (The alerts read its plans' quotas from the same file, `alerts::observe`.)
//!
//! In: the file `gateway_settings` names (only its `[meters]` table is read here) and the
//! `[[meters]]` billing-sync pushes. Out: a refusal naming the first `[[meters]]` entry for a
//! meter the gateway neither has built in nor declares: its push would never carry a unit,
//! and the mistake (usually a misspelling) would go unseen until an invoice came out short.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use tollgate_runtime::settings::Invalid;

use crate::settings::MeterSettings;

#[derive(Debug, thiserror::Error)]
pub enum GatewayFileError {
    #[error("gateway_settings {path}: cannot read: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("gateway_settings {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0} (the meters of gateway_settings {1})")]
    Undeclared(Invalid, String),
}

/// The part of the gateway's settings read here; every other table is the gateway's.
#[derive(Deserialize)]
struct MetersPart {
    #[serde(default)]
    meters: BTreeMap<String, toml::Table>,
}

/// Checks every `[[meters]]` entry against the meters the gateway at `path` counts.
pub fn check_meters(path: &Path, meters: &[MeterSettings]) -> Result<(), GatewayFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| GatewayFileError::Read {
        path: shown.clone(),
        error,
    })?;
    let part: MetersPart = toml::from_str(&text).map_err(|e| GatewayFileError::Parse {
        path: shown.clone(),
        message: e.to_string().lines().map(str::trim).collect::<Vec<_>>().join(" "),
    })?;
    undeclared(&part, meters).map_err(|invalid| GatewayFileError::Undeclared(invalid, shown))
}

fn undeclared(part: &MetersPart, meters: &[MeterSettings]) -> Result<(), Invalid> {
    let counted: Vec<&str> = tollgate_runtime::meters::BUILT_IN
        .into_iter()
        .filter(|m| *m != "concurrent")
        .chain(part.meters.keys().map(String::as_str))
        .collect();
    for (i, m) in meters.iter().enumerate() {
        if !counted.contains(&m.meter.as_str()) {
            return Err(Invalid::new(
                format!("meters[{i}].meter"),
                &m.meter,
                format!("a meter the gateway counts ({})", counted.join(", ")),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(names: &[&str]) -> Vec<MeterSettings> {
        names
            .iter()
            .map(|name| MeterSettings {
                meter: (*name).to_owned(),
                event_name: format!("tollgate_{name}"),
            })
            .collect()
    }

    #[test]
    fn a_billing_meter_must_be_built_in_or_declared() {
        let gateway: MetersPart =
            toml::from_str("[service]\nid = \"gw\"\n[meters.tokens]\nunit = \"tokens\"\n").unwrap();
        undeclared(&gateway, &entries(&["requests", "compute_units", "tokens"])).unwrap();
        let err = undeclared(&gateway, &entries(&["requests", "tokenz"])).unwrap_err();
        assert_eq!(err.field, "meters[1].meter");
        assert!(err.expected.contains("tokens"), "{err}");
        let plain: MetersPart = toml::from_str("").unwrap();
        assert_eq!(
            undeclared(&plain, &entries(&["tokens"])).unwrap_err().field,
            "meters[0].meter"
        );
    }
}

//! The plan catalogue (`config/plans.toml`): the one list of plan names, with their prices.
//!
//! In: the catalogue file's text. Out: a validated [`Catalogue`] and the arithmetic of its
//! prices ([`PlanPrices::usage_amount`], [`PlanPrices::amount`]). The gateway's `[plans.*]`
//! (limits) and billing-sync's Stripe products, prices and subscriptions refer to plans by
//! these names; billing-sync prices invoices with it and, for spend caps, the gateway will
//! price admitted usage with the same numbers. It lives here, in the crate every service
//! already depends on, so both read one file with one reader.
//!
//! Prices are in the currency's minor units (cents for `usd`): a whole `monthly_fee_minor`
//! and per meter a decimal-string `unit_price_minor` with up to 12 decimal places, as Stripe's
//! `unit_amount_decimal` (<https://docs.stripe.com/api/prices/create#create_price-unit_amount_decimal>).
//! `included_units` per period are free (a graduated first tier at 0).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

use crate::settings::Invalid;

/// Decimal places Stripe accepts in `unit_amount_decimal`.
pub const MAX_DECIMALS: u32 = 12;
const SCALE: i128 = 1_000_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("{path}: cannot read: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {invalid}")]
    Invalid { path: String, invalid: Invalid },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// Plans by name: `[plans.<name>]`.
    pub plans: BTreeMap<String, PlanPrices>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanPrices {
    /// ISO 4217 currency, lowercase (`usd`, `eur`).
    pub currency: String,
    /// Flat fee per month in minor units; 0 or absent: none.
    #[serde(default)]
    pub monthly_fee_minor: u64,
    /// Price per unit of each metered meter (`requests`, `compute_units`, …).
    #[serde(default)]
    pub meters: BTreeMap<String, MeterPrice>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterPrice {
    /// Price of one unit in minor units, a decimal string (`"0.002"`).
    pub unit_price_minor: UnitPrice,
    /// Units per month that cost nothing.
    #[serde(default)]
    pub included_units: u64,
}

/// A non-negative decimal with at most [`MAX_DECIMALS`] places, held exactly as
/// `value · 10^12`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitPrice {
    scaled: i128,
}

impl UnitPrice {
    pub fn parse(text: &str) -> Option<Self> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty() || !digits(int) || !digits(frac) || frac.len() > MAX_DECIMALS as usize || int.len() > 15 {
            return None;
        }
        if text.contains('.') && frac.is_empty() {
            return None;
        }
        let int: i128 = int.parse().ok()?;
        let mut frac_scaled: i128 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_scaled += i128::from(b - b'0') * 10i128.pow(MAX_DECIMALS - 1 - i as u32);
        }
        Some(Self {
            scaled: int * SCALE + frac_scaled,
        })
    }

    pub fn is_zero(&self) -> bool {
        self.scaled == 0
    }

    /// The value · 10^12: ClickHouse's `Decimal(38, 12)` holds exactly this integer.
    pub fn scaled(&self) -> i128 {
        self.scaled
    }
}

/// Shortest decimal text: what Stripe is sent as `unit_amount_decimal`.
impl fmt::Display for UnitPrice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let int = self.scaled / SCALE;
        let frac = self.scaled % SCALE;
        if frac == 0 {
            return write!(f, "{int}");
        }
        let text = format!("{frac:012}");
        write!(f, "{int}.{}", text.trim_end_matches('0'))
    }
}

impl<'de> Deserialize<'de> for UnitPrice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        UnitPrice::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not a price: expected a non-negative decimal string with at most {MAX_DECIMALS} decimal places, like \"0.25\""
            ))
        })
    }
}

/// An amount in minor units, exact to 10^-12 (sums of lines before rounding).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Amount {
    scaled: i128,
}

impl Amount {
    pub fn from_minor(minor: i64) -> Self {
        Self {
            scaled: i128::from(minor) * SCALE,
        }
    }

    /// Rounded to whole minor units, half away from zero (Stripe rounds line amounts to the
    /// nearest minor unit).
    pub fn round_minor(&self) -> i64 {
        let half = SCALE / 2;
        let rounded = if self.scaled >= 0 {
            (self.scaled + half) / SCALE
        } else {
            (self.scaled - half) / SCALE
        };
        rounded.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }
}

impl std::ops::Add for Amount {
    type Output = Amount;
    fn add(self, other: Amount) -> Amount {
        Amount {
            scaled: self.scaled + other.scaled,
        }
    }
}

impl PlanPrices {
    /// What `units` of `meter` cost in one month, before rounding; `None` when the plan does
    /// not price the meter.
    pub fn usage_amount(&self, meter: &str, units: i64) -> Option<Amount> {
        let price = self.meters.get(meter)?;
        let charged = (i128::from(units) - i128::from(price.included_units)).max(0);
        Some(Amount {
            scaled: charged * price.unit_price_minor.scaled,
        })
    }

    /// The month's total in minor units for `units` per meter: the fee plus each priced
    /// meter's line, each line rounded as an invoice line is.
    pub fn amount(&self, units: &BTreeMap<String, i64>) -> i64 {
        let lines: i64 = units
            .iter()
            .filter_map(|(meter, units)| self.usage_amount(meter, *units))
            .map(|a| a.round_minor())
            .sum();
        lines + self.monthly_fee_minor as i64
    }
}

impl Catalogue {
    /// Parses and validates catalogue text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, CatalogueError> {
        let catalogue: Catalogue = toml::from_str(text).map_err(|e| CatalogueError::Parse {
            path: origin.to_owned(),
            message: e.to_string().lines().map(str::trim).collect::<Vec<_>>().join(" "),
        })?;
        catalogue.validate().map_err(|invalid| CatalogueError::Invalid {
            path: origin.to_owned(),
            invalid,
        })?;
        Ok(catalogue)
    }

    /// Reads and validates the catalogue file.
    pub fn load(path: &std::path::Path) -> Result<Self, CatalogueError> {
        let text = std::fs::read_to_string(path).map_err(|error| CatalogueError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Plan names become Stripe product ids and lookup keys; currencies are ISO codes.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.plans.is_empty() {
            return Err(Invalid::new("plans", "{}", "at least one [plans.<name>]"));
        }
        for (name, plan) in &self.plans {
            let ok_name = (1..=40).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
            if !ok_name {
                return Err(Invalid::new(
                    format!("plans.{name}"),
                    name,
                    "a plan name of 1 to 40 lowercase letters, digits, `_` or `-`",
                ));
            }
            let ok_currency = plan.currency.len() == 3 && plan.currency.bytes().all(|b| b.is_ascii_lowercase());
            if !ok_currency {
                return Err(Invalid::new(
                    format!("plans.{name}.currency"),
                    &plan.currency,
                    "a lowercase ISO 4217 code like \"usd\"",
                ));
            }
            if plan.monthly_fee_minor == 0 && plan.meters.is_empty() {
                return Err(Invalid::new(
                    format!("plans.{name}"),
                    "no fee and no meters",
                    "a monthly_fee_minor or at least one [plans.<name>.meters] price (Stripe needs one item)",
                ));
            }
            for meter in plan.meters.keys() {
                if meter.is_empty() || meter.len() > 60 {
                    return Err(Invalid::new(
                        format!("plans.{name}.meters"),
                        meter,
                        "a meter name of 1 to 60 characters",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every meter some plan prices, once.
    pub fn meters(&self) -> std::collections::BTreeSet<&str> {
        self.plans
            .values()
            .flat_map(|p| p.meters.keys().map(String::as_str))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/plans.toml");

    #[test]
    fn the_example_catalogue_is_valid() {
        let c = Catalogue::parse(EXAMPLE, "plans.toml").unwrap();
        assert!(c.plans.contains_key("free") && c.plans.contains_key("enterprise"));
    }

    #[test]
    fn prices_parse_exactly_and_print_shortest() {
        for (text, shown) in [
            ("0", "0"),
            ("0.25", "0.25"),
            ("12.500", "12.5"),
            ("0.000000000001", "0.000000000001"),
        ] {
            assert_eq!(UnitPrice::parse(text).unwrap().to_string(), shown, "{text}");
        }
        for bad in ["", "-1", "1.", ".5", "1e3", "0.0000000000001", "1,5", " 1"] {
            assert!(UnitPrice::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn amounts_charge_units_above_the_included_ones_and_round_per_line() {
        let plan = Catalogue::parse(
            "[plans.p]\ncurrency = \"usd\"\nmonthly_fee_minor = 2900\n\
             meters.requests = { unit_price_minor = \"0.01\", included_units = 1000 }\n\
             meters.compute_units = { unit_price_minor = \"0.25\" }\n",
            "t",
        )
        .unwrap()
        .plans
        .remove("p")
        .unwrap();
        assert_eq!(plan.usage_amount("requests", 999).unwrap().round_minor(), 0);
        assert_eq!(plan.usage_amount("requests", 1_150).unwrap().round_minor(), 2); // 1.5 → 2
        assert_eq!(plan.usage_amount("compute_units", 3).unwrap().round_minor(), 1); // 0.75 → 1
        assert!(plan.usage_amount("bytes", 3).is_none());
        let units = BTreeMap::from([("requests".to_owned(), 1_150), ("compute_units".to_owned(), 3)]);
        assert_eq!(plan.amount(&units), 2900 + 2 + 1);
    }

    #[test]
    fn bad_catalogues_name_the_setting() {
        let err = Catalogue::parse(
            "[plans.Gold]\ncurrency = \"usd\"\nmonthly_fee_minor = 1\n",
            "plans.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("plans.toml: setting `plans.Gold`"), "{err}");
        let err = Catalogue::parse("[plans.p]\ncurrency = \"USD\"\nmonthly_fee_minor = 1\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("plans.p.currency"), "{err}");
        let err = Catalogue::parse("[plans.p]\ncurrency = \"usd\"\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Stripe needs one item"), "{err}");
        let err = Catalogue::parse(
            "[plans.p]\ncurrency = \"usd\"\nmeters.requests = { unit_price_minor = \"-1\" }\n",
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("is not a price"), "{err}");
        let err = Catalogue::parse("[plans.p]\ncurrency = \"usd\"\nfee = 3\n", "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `fee`"), "{err}");
    }
}

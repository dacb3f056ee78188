//! Which thresholds an observed total has crossed that have not raised an alert yet, and the
//! stable id each alert is delivered under.
//!
//! In: a threshold list (percentages), the limit, the total observed now, the thresholds
//! already recorded for this tenant, limit and period. Out: the thresholds to alert on now, and
//! [`AlertKey::webhook_id`]. Pure: the caller records what this returns before delivering it,
//! and the next call is given it as `recorded`, so a threshold alerts once per period however
//! the observed totals move (late events, a raised cap, a restart in between).

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};

/// The thresholds `observed` has reached (`observed ≥ threshold % of limit`) and that are not
/// in `recorded`, ascending. Nothing is reached before any usage: with a limit of 0, the first
/// unit crosses every threshold.
pub fn newly_crossed(thresholds: &[u32], limit: i64, observed: i64, recorded: &BTreeSet<u32>) -> Vec<u32> {
    if observed <= 0 {
        return Vec::new();
    }
    let mut out: Vec<u32> = thresholds
        .iter()
        .copied()
        .filter(|t| i128::from(observed) * 100 >= i128::from(*t) * i128::from(limit.max(0)))
        .filter(|t| !recorded.contains(t))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// What an alert is about: once per tenant, subject, threshold and period.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AlertKey {
    pub tenant_id: String,
    pub kind: Kind,
    /// `monthly_cap` for spend; the limit's name for a quota.
    pub subject: String,
    /// `YYYY-MM` or, for a daily quota, `YYYY-MM-DD` (UTC).
    pub period: String,
    pub threshold: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Spend,
    Quota,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spend => "spend",
            Kind::Quota => "quota",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "spend" => Some(Kind::Spend),
            "quota" => Some(Kind::Quota),
            _ => None,
        }
    }
}

impl AlertKey {
    /// `alert_` and 32 hex digits of SHA-256 over the key's fields: the same alert always has
    /// the same id, whichever process or pass records it, so receivers can dedupe on
    /// `webhook-id` and a second record of the same alert replaces the first in ClickHouse.
    pub fn webhook_id(&self) -> String {
        let mut hash = Sha256::new();
        for part in [
            self.tenant_id.as_str(),
            self.kind.as_str(),
            self.subject.as_str(),
            self.period.as_str(),
            &self.threshold.to_string(),
        ] {
            // Length-prefixed, so no two different keys hash the same text.
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part.as_bytes());
        }
        let digest = hash.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("alert_{hex}")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn thresholds_are_crossed_at_their_percentage_of_the_limit() {
        let none = BTreeSet::new();
        assert_eq!(newly_crossed(&[50, 80, 100], 1000, 499, &none), Vec::<u32>::new());
        assert_eq!(newly_crossed(&[50, 80, 100], 1000, 500, &none), vec![50]);
        assert_eq!(newly_crossed(&[50, 80, 100], 1000, 1200, &none), vec![50, 80, 100]);
        assert_eq!(
            newly_crossed(&[50, 80, 100], 1000, 1200, &BTreeSet::from([50])),
            vec![80, 100]
        );
        assert_eq!(newly_crossed(&[80, 100], 0, 0, &none), Vec::<u32>::new());
        assert_eq!(newly_crossed(&[80, 100], 0, 1, &none), vec![80, 100]);
    }

    #[test]
    fn webhook_ids_are_stable_and_differ_per_field() {
        let key = AlertKey {
            tenant_id: "t_acme".into(),
            kind: Kind::Spend,
            subject: "monthly_cap".into(),
            period: "2026-12".into(),
            threshold: 80,
        };
        assert_eq!(key.webhook_id(), key.clone().webhook_id());
        assert!(key.webhook_id().starts_with("alert_") && key.webhook_id().len() == 38);
        let others = [
            AlertKey {
                threshold: 50,
                ..key.clone()
            },
            AlertKey {
                period: "2027-01".into(),
                ..key.clone()
            },
            AlertKey {
                kind: Kind::Quota,
                ..key.clone()
            },
            AlertKey {
                tenant_id: "t_acme2".into(),
                ..key.clone()
            },
        ];
        for other in others {
            assert_ne!(other.webhook_id(), key.webhook_id(), "{other:?}");
        }
    }

    proptest! {
        /// Whatever the sequence of observed totals (rising, falling, repeating), each
        /// threshold alerts at most once, and exactly the thresholds the highest total reached
        /// have alerted by the end.
        #[test]
        fn each_threshold_alerts_once_whatever_the_totals(
            mut thresholds in proptest::collection::vec(1u32..=100, 1..6),
            limit in 0i64..10_000,
            totals in proptest::collection::vec(-100i64..20_000, 0..40),
        ) {
            thresholds.sort_unstable();
            thresholds.dedup();
            let mut recorded = BTreeSet::new();
            let mut emitted = Vec::new();
            for total in &totals {
                for t in newly_crossed(&thresholds, limit, *total, &recorded) {
                    emitted.push(t);
                    recorded.insert(t);
                }
            }
            let unique: BTreeSet<u32> = emitted.iter().copied().collect();
            prop_assert_eq!(unique.len(), emitted.len(), "a threshold alerted twice: {:?}", emitted);
            let max = totals.iter().copied().max().unwrap_or(0);
            let expected: BTreeSet<u32> = thresholds
                .iter()
                .copied()
                .filter(|t| max > 0 && i128::from(max) * 100 >= i128::from(*t) * i128::from(limit))
                .collect();
            prop_assert_eq!(unique, expected);
        }
    }
}

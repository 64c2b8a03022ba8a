//! Retention rules and the restic `forget` arguments they become.

use serde::{Deserialize, Serialize};

use crate::field::FieldError;

/// Which snapshots of one policy to keep (restic's `--keep-*` rules). All
/// rules absent means keep everything: a backup agent never deletes data
/// nobody asked it to delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100000)]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100000)]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100000)]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100000)]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100000)]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 100000)]
    pub keep_yearly: Option<u32>,
    /// A restic duration such as `48h` or `1y2m3d`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 32, pattern = "^([0-9]+[ymdh])+$", example = "48h")]
    pub keep_within: Option<String>,
}

/// The largest count accepted for a keep rule.
pub const MAX_KEEP: u32 = 100_000;

impl Retention {
    fn counts(&self) -> [(&'static str, &'static str, Option<u32>); 6] {
        [
            ("retention.keepLast", "--keep-last", self.keep_last),
            ("retention.keepHourly", "--keep-hourly", self.keep_hourly),
            ("retention.keepDaily", "--keep-daily", self.keep_daily),
            ("retention.keepWeekly", "--keep-weekly", self.keep_weekly),
            ("retention.keepMonthly", "--keep-monthly", self.keep_monthly),
            ("retention.keepYearly", "--keep-yearly", self.keep_yearly),
        ]
    }

    /// True when no rule would make `forget` remove anything: a count of 0
    /// means "no such rule", as in restic.
    pub fn keeps_everything(&self) -> bool {
        self.counts().iter().all(|(_, _, v)| v.unwrap_or(0) == 0) && self.keep_within.is_none()
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        for (field, _, v) in self.counts() {
            if let Some(v) = v {
                if v > MAX_KEEP {
                    return Err(FieldError::new(field, format!("must be between 0 and {MAX_KEEP}; got {v}")));
                }
            }
        }
        if let Some(w) = &self.keep_within {
            if !is_restic_duration(w) {
                return Err(FieldError::new(
                    "retention.keepWithin",
                    format!("{w:?} is not a duration: use numbers with units y, m, d, h, e.g. \"48h\" or \"1y2m\""),
                ));
            }
        }
        Ok(())
    }

    /// The `--keep-*` arguments for `restic forget`; empty when
    /// [`Retention::keeps_everything`].
    pub fn forget_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (_, flag, v) in self.counts() {
            if let Some(v) = v.filter(|v| *v > 0) {
                args.push(flag.to_string());
                args.push(v.to_string());
            }
        }
        if let Some(w) = &self.keep_within {
            args.push("--keep-within".into());
            args.push(w.clone());
        }
        args
    }
}

fn is_restic_duration(s: &str) -> bool {
    let mut saw_digit = false;
    let mut saw_unit = false;
    for c in s.chars() {
        match c {
            '0'..='9' => saw_digit = true,
            'y' | 'm' | 'd' | 'h' if saw_digit => {
                saw_digit = false;
                saw_unit = true;
            }
            _ => return false,
        }
    }
    saw_unit && !saw_digit && s.len() <= 32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn no_rules_keep_everything_and_give_no_arguments() {
        let r = Retention::default();
        assert!(r.keeps_everything());
        assert!(r.forget_args().is_empty());
        let zeros = Retention { keep_last: Some(0), ..Default::default() };
        assert!(zeros.keeps_everything());
    }

    #[test]
    fn rules_become_keep_flags_in_a_stable_order() {
        let r = Retention {
            keep_last: Some(7),
            keep_daily: Some(7),
            keep_weekly: Some(4),
            keep_within: Some("48h".into()),
            ..Default::default()
        };
        assert_eq!(
            r.forget_args(),
            ["--keep-last", "7", "--keep-daily", "7", "--keep-weekly", "4", "--keep-within", "48h"]
        );
    }

    #[test]
    fn bad_keep_within_names_the_field() {
        for bad in ["48", "h", "4x", "-1h", "1h 2d", ""] {
            let r = Retention { keep_within: Some(bad.into()), ..Default::default() };
            assert_eq!(r.validate().unwrap_err().field, "retention.keepWithin", "{bad}");
        }
        for good in ["48h", "1y2m3d4h", "7d"] {
            let r = Retention { keep_within: Some(good.into()), ..Default::default() };
            assert!(r.validate().is_ok(), "{good}");
        }
    }

    proptest! {
        #[test]
        fn forget_args_come_in_flag_value_pairs(last in proptest::option::of(0u32..50), daily in proptest::option::of(0u32..50)) {
            let r = Retention { keep_last: last, keep_daily: daily, ..Default::default() };
            let args = r.forget_args();
            prop_assert_eq!(args.len() % 2, 0);
            prop_assert_eq!(args.is_empty(), r.keeps_everything());
            for pair in args.chunks(2) {
                prop_assert!(pair[0].starts_with("--keep-"));
                prop_assert!(pair[1].parse::<u32>().unwrap() > 0);
            }
        }
    }
}

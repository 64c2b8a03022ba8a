//! The upstream `POST /snapshot` contract, kept for soda-proxy: the body
//! exactly as the proxy sends it, what it asks for once validated, and the
//! policy it becomes for one source. The agent (`legacy.rs`) keys,
//! stores and subscribes; the translation is here, without I/O.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::field::FieldError;
use crate::policy::{PolicySpec, RepositorySpec};
use crate::schedule::{ScheduleSpec, MAX_INTERVAL_SECONDS};
use crate::secret::Secret;

/// The upstream body, field names exactly as soda-proxy sends them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LegacySnapshotRequest {
    #[serde(rename = "AWS_ACCESS_KEY_ID", default)]
    #[schema(write_only, value_type = Option<String>, format = Password)]
    pub aws_access_key_id: Option<Secret>,
    #[serde(rename = "AWS_SECRET_ACCESS_KEY", default)]
    #[schema(write_only, value_type = Option<String>, format = Password)]
    pub aws_secret_access_key: Option<Secret>,
    /// A restic repository URL; empty or absent means the agent's default repository.
    #[serde(rename = "RESTIC_REPOSITORY", default)]
    pub restic_repository: Option<String>,
    /// Required with `RESTIC_REPOSITORY`.
    #[serde(rename = "RESTIC_PASSWORD", default)]
    #[schema(write_only, value_type = Option<String>, format = Password)]
    pub restic_password: Option<Secret>,
    /// Seconds between backups (1 s to 31 days).
    #[serde(rename = "timeInterval")]
    #[schema(minimum = 1, maximum = 2678400)]
    pub time_interval: i64,
    /// An absolute path on this node; empty or absent means every CSI volume
    /// mounted on this node, now and later.
    #[serde(rename = "resticSourceRepo", default)]
    pub restic_source_repo: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegacyPolicyRef {
    pub id: String,
    pub name: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// "created" or "updated".
    #[schema(value_type = String, example = "created")]
    pub action: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegacySnapshotResponse {
    pub message: String,
    pub policies: Vec<LegacyPolicyRef>,
    /// For an empty `resticSourceRepo`: volumes that appear later on this
    /// node are picked up by this subscription.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<String>,
}

impl LegacySnapshotRequest {
    /// The body as text fields named as the proxy names them (secrets
    /// included): the one form in which it is handed on to the other
    /// nodes' agents (the data of a Secret), and read back by
    /// [`LegacySnapshotRequest::from_fields`].
    pub fn to_fields(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: Option<&str>| {
            if let Some(v) = v {
                m.insert(k.to_string(), v.to_string());
            }
        };
        put("AWS_ACCESS_KEY_ID", self.aws_access_key_id.as_ref().map(Secret::expose));
        put("AWS_SECRET_ACCESS_KEY", self.aws_secret_access_key.as_ref().map(Secret::expose));
        put("RESTIC_REPOSITORY", self.restic_repository.as_deref());
        put("RESTIC_PASSWORD", self.restic_password.as_ref().map(Secret::expose));
        put("resticSourceRepo", self.restic_source_repo.as_deref());
        m.insert("timeInterval".into(), self.time_interval.to_string());
        m
    }

    /// The body [`LegacySnapshotRequest::to_fields`] wrote (also by agents
    /// before this one: the same fields), or what is wrong with the fields.
    pub fn from_fields(fields: BTreeMap<String, String>) -> Result<LegacySnapshotRequest, FieldError> {
        let mut req = LegacySnapshotRequest {
            aws_access_key_id: None,
            aws_secret_access_key: None,
            restic_repository: None,
            restic_password: None,
            time_interval: 0,
            restic_source_repo: None,
        };
        let mut interval = None;
        for (k, v) in fields {
            match k.as_str() {
                "AWS_ACCESS_KEY_ID" => req.aws_access_key_id = Some(Secret::new(v)),
                "AWS_SECRET_ACCESS_KEY" => req.aws_secret_access_key = Some(Secret::new(v)),
                "RESTIC_REPOSITORY" => req.restic_repository = Some(v),
                "RESTIC_PASSWORD" => req.restic_password = Some(Secret::new(v)),
                "resticSourceRepo" => req.restic_source_repo = Some(v),
                "timeInterval" => {
                    interval = Some(v.trim().parse::<i64>().map_err(|_| {
                        FieldError::new("timeInterval", format!("{v:?} is not a whole number of seconds"))
                    })?)
                }
                _ => return Err(FieldError::new(k.clone(), "is not a field of the legacy body")),
            }
        }
        req.time_interval = interval.ok_or_else(|| FieldError::new("timeInterval", "is missing"))?;
        Ok(req)
    }
}

/// What a legacy body asks for, validated.
pub struct LegacyTarget {
    pub repository: RepositorySpec,
    pub interval: u64,
}

impl LegacyTarget {
    /// The repository and interval a body asks for, or what is wrong with it.
    pub fn of(req: &LegacySnapshotRequest) -> Result<LegacyTarget, FieldError> {
        if !(1..=MAX_INTERVAL_SECONDS as i64).contains(&req.time_interval) {
            return Err(FieldError::new(
                "timeInterval",
                format!("timeInterval must be between 1 and {MAX_INTERVAL_SECONDS} seconds; got {}", req.time_interval),
            ));
        }
        let mut env = BTreeMap::new();
        if let Some(k) = req.aws_access_key_id.clone().filter(|s| !s.is_empty()) {
            env.insert("AWS_ACCESS_KEY_ID".to_string(), Some(k));
        }
        if let Some(k) = req.aws_secret_access_key.clone().filter(|s| !s.is_empty()) {
            env.insert("AWS_SECRET_ACCESS_KEY".to_string(), Some(k));
        }
        let url = req.restic_repository.clone().filter(|u| !u.trim().is_empty());
        let password = req.restic_password.clone().filter(|p| !p.is_empty());
        if url.is_some() && password.is_none() {
            return Err(FieldError::new(
                "RESTIC_PASSWORD",
                "RESTIC_PASSWORD is required with RESTIC_REPOSITORY (set it in the SODA profile's customProperties)",
            ));
        }
        let mut repository = RepositorySpec { url, password, env, ..Default::default() };
        if repository.url.is_none() {
            // The agent's default repository (its own password).
            repository.password = None;
        }
        Ok(LegacyTarget { repository, interval: req.time_interval as u64 })
    }

    /// The policy for one source.
    pub fn spec(&self, name: String, path: &str) -> PolicySpec {
        let schedule = ScheduleSpec { interval_seconds: Some(self.interval), ..Default::default() };
        let mut spec = PolicySpec::with_defaults(name, path, schedule);
        spec.repository = self.repository.clone();
        spec
    }
}

/// `legacy-<hint>-<hash>`, cut to fit the name rule.
pub fn policy_name(hint: &str, key: &str) -> String {
    let clean: String = hint
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let clean = clean.trim_matches('-');
    let clean = if clean.len() > 44 { &clean[..44] } else { clean };
    let clean = clean.trim_matches('-');
    if clean.is_empty() {
        format!("legacy-{}", &key[..8])
    } else {
        format!("legacy-{clean}-{}", &key[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_handed_on_as_fields_comes_back_the_same_and_bad_fields_are_named() {
        let body = serde_json::json!({"RESTIC_REPOSITORY": "s3:http://h/b", "RESTIC_PASSWORD": "pw",
            "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "timeInterval": 600});
        let req: LegacySnapshotRequest = serde_json::from_value(body).unwrap();
        let fields = req.to_fields();
        assert_eq!(fields["timeInterval"], "600");
        assert_eq!(fields["RESTIC_PASSWORD"], "pw");
        assert!(!fields.contains_key("resticSourceRepo"));
        let back = LegacySnapshotRequest::from_fields(fields.clone()).unwrap();
        assert_eq!(back.to_fields(), fields);
        let mut bad = fields.clone();
        bad.insert("timeInterval".into(), "ten".into());
        assert_eq!(LegacySnapshotRequest::from_fields(bad).unwrap_err().field, "timeInterval");
        let mut unknown = fields.clone();
        unknown.insert("EXTRA".into(), "x".into());
        assert_eq!(LegacySnapshotRequest::from_fields(unknown).unwrap_err().field, "EXTRA");
        let mut missing = fields;
        missing.remove("timeInterval");
        assert!(LegacySnapshotRequest::from_fields(missing).is_err());
    }

    #[test]
    fn legacy_names_are_valid_policy_names() {
        for hint in ["pvc-0a1b", "weird name; rm -rf /", "", "---", &"x".repeat(200)] {
            let n = policy_name(hint, "0123456789abcdef");
            crate::policy::validate_name(&n).unwrap_or_else(|e| panic!("{hint:?} -> {n:?}: {e}"));
        }
    }

    #[test]
    fn the_upstream_body_parses_exactly() {
        let body = r#"{"AWS_ACCESS_KEY_ID":"AKIA","AWS_SECRET_ACCESS_KEY":"s","RESTIC_REPOSITORY":"s3:h/b","RESTIC_PASSWORD":"p","timeInterval":3600,"resticSourceRepo":""}"#;
        let r: LegacySnapshotRequest = serde_json::from_str(body).unwrap();
        assert_eq!(r.time_interval, 3600);
        assert_eq!(r.restic_source_repo.as_deref(), Some(""));
        assert!(serde_json::from_str::<LegacySnapshotRequest>(r#"{"timeInterval":1,"extra":1}"#).is_err());
    }

    #[test]
    fn a_body_becomes_a_valid_policy_with_the_defaults_of_a_body_that_says_nothing_else() {
        let req: LegacySnapshotRequest = serde_json::from_str(
            r#"{"RESTIC_REPOSITORY":"s3:h/b","RESTIC_PASSWORD":"p","timeInterval":600,"resticSourceRepo":"/data"}"#,
        )
        .unwrap();
        let spec = LegacyTarget::of(&req).unwrap().spec("legacy-data-01234567".into(), "/data");
        spec.validate(chrono::Utc::now()).unwrap();
        assert_eq!(spec.schedule.interval_seconds, Some(600));
        assert_eq!(spec.repository.url.as_deref(), Some("s3:h/b"));
        let said_nothing: PolicySpec = serde_json::from_value(
            serde_json::json!({"name": "x", "source": {"path": "/data"}, "schedule": {"intervalSeconds": 600}}),
        )
        .unwrap();
        assert_eq!(
            (spec.verify_unchanged, spec.paused, &spec.retention, spec.jitter_seconds),
            (said_nothing.verify_unchanged, said_nothing.paused, &said_nothing.retention, said_nothing.jitter_seconds)
        );
    }
}

//! Backup policies: what the API accepts, and the rules a policy must keep.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path};

use crate::field::{is_dns_subdomain, FieldError};
use crate::retention::Retention;
use crate::schedule::{Schedule, ScheduleSpec, Schedules};
use crate::secret::Secret;

/// Who made a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Api,
    Legacy,
    Kubernetes,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Api => "api",
            Origin::Legacy => "legacy",
            Origin::Kubernetes => "kubernetes",
        }
    }
    pub fn parse(s: &str) -> Option<Origin> {
        [Origin::Api, Origin::Legacy, Origin::Kubernetes].into_iter().find(|o| o.as_str() == s)
    }
}

/// What to back up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// An existing directory on this node, below one of the agent's allowed roots.
    #[schema(example = "/var/lib/data")]
    pub path: String,
}

/// Where backups go. `url` absent means the agent's default local
/// repository. Secrets are accepted here and never shown again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RepositorySpec {
    /// Any restic repository URL (`s3:host/bucket/prefix`, `rest:http://...`,
    /// `/local/path`); absent means the agent's default repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The repository password; write-only. Left out on PUT/PATCH: kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(write_only, value_type = Option<String>, format = Password)]
    pub password: Option<Secret>,
    /// Storage credentials passed to restic (AWS_*, B2_*, AZURE_*, GOOGLE_*,
    /// OS_*, ST_*); write-only. A null value on PUT keeps the stored one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(write_only, value_type = BTreeMap<String, Option<String>>)]
    pub env: BTreeMap<String, Option<Secret>>,
    /// Read-only in responses; tolerated (and ignored) on input so that a
    /// GET can be edited and PUT back.
    /// A Kubernetes Secret with `RESTIC_REPOSITORY`, `RESTIC_PASSWORD` and
    /// storage keys, read when each run starts and never stored by the
    /// agent. Set by the Kubernetes adapter for annotated claims; instead of
    /// `url`, `password` and `env`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// A SODA profile (its id) whose `customProperties` hold the repository
    /// (`RESTIC_REPOSITORY`, `RESTIC_PASSWORD`, storage keys), read from SODA
    /// when each run starts (the copy polled last when SODA does not answer)
    /// and never stored by the agent. Set by the Kubernetes adapter for
    /// claims whose profile names a repository; instead of `url`,
    /// `password`, `env` and `secretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soda_profile: Option<String>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub password_set: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub env_set: Option<IgnoredAny>,
}

/// A Secret in a namespace of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
}

/// How the agent makes the source consistent before restic reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyMode {
    #[default]
    None,
    Auto,
    Btrfs,
    Reflink,
    Blockclone,
    Fsfreeze,
    Lvm,
}

/// Commands run before and after the backup, each an argv array (no shell).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre: Vec<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post: Vec<Vec<String>>,
}

fn default_max_freeze_ms() -> u64 {
    2000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistencySpec {
    #[serde(default)]
    pub mode: ConsistencyMode,
    #[serde(default)]
    pub hooks: Hooks,
    #[serde(default = "default_max_freeze_ms")]
    #[schema(minimum = 1, maximum = 600000, default = 2000)]
    pub max_freeze_ms: u64,
    /// Fail the run instead of backing up the live volume when no
    /// point-in-time method applies.
    #[serde(default)]
    pub required: bool,
}

impl Default for ConsistencySpec {
    fn default() -> Self {
        ConsistencySpec {
            mode: ConsistencyMode::None,
            hooks: Hooks::default(),
            max_freeze_ms: default_max_freeze_ms(),
            required: false,
        }
    }
}

fn default_verify_unchanged() -> bool {
    true
}

fn default_sample_files() -> u32 {
    100
}
fn default_drill_max_bytes() -> u64 {
    1 << 30
}

/// A scheduled restore drill: the newest snapshot's files (a random sample,
/// or all) are restored into a scratch directory and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DrillSpec {
    /// When drills run (e.g. weekly: `{"intervalSeconds": 604800}`).
    pub schedule: ScheduleSpec,
    /// Random delay per drill, at most the time between two drills.
    #[serde(default)]
    pub jitter_seconds: u64,
    /// Files restored and checked per drill; 0 means every file.
    #[serde(default = "default_sample_files")]
    #[schema(maximum = 100000, default = 100)]
    pub sample_files: u32,
    /// The most a drill restores into its scratch directory.
    #[serde(default = "default_drill_max_bytes")]
    #[schema(minimum = 1048576, default = 1073741824)]
    pub max_bytes: u64,
}

/// A policy as written by a caller (POST/PUT body, or a PATCH merged into
/// the stored one). Unknown fields are refused; the read-only fields of a
/// response are tolerated and ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicySpec {
    /// Unique on this agent: 1 to 63 letters, digits, `-`, `_` or `.`,
    /// starting and ending with a letter or digit.
    #[schema(max_length = 63, pattern = "^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$", example = "orders-db")]
    pub name: String,
    pub source: SourceSpec,
    #[serde(default)]
    pub repository: RepositorySpec,
    pub schedule: ScheduleSpec,
    /// Each run starts up to this many seconds after its slot (the same
    /// offset for the same policy and slot); at most the time between two runs.
    #[serde(default)]
    pub jitter_seconds: u64,
    #[serde(default)]
    pub retention: Retention,
    /// The repository refuses this node's deletes (an append-only REST
    /// server, an S3 user without DeleteObject): the agent never runs
    /// `forget` or `prune` on it; a maintainer holding the delete rights
    /// applies `retention` (see `soda-syncer maintain`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub append_only: bool,
    #[serde(default)]
    pub consistency: ConsistencySpec,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Extra restic tags: letters, digits and `- _ . = : /`; the prefixes
    /// `soda-syncer`, `policy=` and `volume=` are the agent's own.
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub paused: bool,
    /// Scheduled restore drills of this policy's snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<DrillSpec>,
    /// A scheduled run first walks the volume's metadata; when nothing
    /// changed since the last real backup it is recorded as `unchanged`
    /// (pointing to that snapshot) without running restic. See the README,
    /// "Unchanged volumes". `false`: every run runs restic.
    #[serde(default = "default_verify_unchanged")]
    #[schema(default = true)]
    pub verify_unchanged: bool,
    // Read-only response fields, ignored on input.
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub id: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub origin: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub created_at: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub updated_at: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub next_run_at: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub last_run: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub status: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub volume: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub paused_by_user: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub consecutive_failures: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub secrets_unavailable: Option<IgnoredAny>,
    #[serde(default, skip_serializing)]
    #[schema(ignore)]
    pub maintenance_lease: Option<IgnoredAny>,
}

/// The longest policy name.
pub const MAX_NAME_LEN: usize = 63;

/// Tags the agent writes itself; a caller may not use them.
pub const RESERVED_TAG_PREFIXES: [&str; 3] = ["soda-syncer", "policy=", "volume="];

/// Environment variables a repository may pass to restic: the storage
/// backends' credentials. Anything else (PATH, LD_PRELOAD,
/// RESTIC_PASSWORD_COMMAND, ...) could make restic run other programs.
pub const ALLOWED_ENV_PREFIXES: [&str; 6] = ["AWS_", "B2_", "AZURE_", "GOOGLE_", "OS_", "ST_"];

pub fn validate_name(name: &str) -> Result<(), FieldError> {
    let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let ok_ends = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars || !ok_ends {
        return Err(FieldError::new(
            "name",
            format!(
                "{name:?} is not a valid name: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// An absolute path with no `.`/`..` components and no NUL: the form
/// a source or target must have before it is even looked at on disk.
pub fn validate_abs_path(field: &str, path: &str) -> Result<(), FieldError> {
    let p = Path::new(path);
    if path.is_empty() || !p.is_absolute() {
        return Err(FieldError::new(field, format!("{path:?} must be an absolute path, e.g. /var/lib/data")));
    }
    if path.contains('\0') || path.contains('\n') {
        return Err(FieldError::new(field, "the path may not contain NUL or newline characters"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(FieldError::new(field, format!("{path:?} may not contain '.' or '..' components")));
    }
    Ok(())
}

impl PolicySpec {
    /// A policy of `path` on `schedule`, every other field at the default a
    /// body that leaves it out gets (the agent's repository included): made
    /// through serde, so a new field's default is written once, on the field.
    pub fn with_defaults(name: String, path: &str, schedule: ScheduleSpec) -> PolicySpec {
        serde_json::from_value(serde_json::json!({ "name": name, "source": { "path": path }, "schedule": schedule }))
            .expect("a name, a source and a schedule make a policy body")
    }

    /// The policy's schedules, parsed (the backups' and the drills').
    pub fn schedules(&self) -> Result<Schedules, FieldError> {
        let backup = Schedule::parse(&self.schedule)?;
        let drill = match &self.drill {
            Some(d) => Some(
                Schedule::parse(&d.schedule).map_err(|e| FieldError::new(format!("drill.{}", e.field), e.message))?,
            ),
            None => None,
        };
        Ok(Schedules { backup, drill })
    }

    /// Every check that needs no disk, clock or network. Returns the parsed
    /// schedules, which admission attaches to the policy so that nothing
    /// after it parses them again.
    pub fn validate(&self, now: chrono::DateTime<chrono::Utc>) -> Result<Schedules, FieldError> {
        validate_name(&self.name)?;
        validate_abs_path("source.path", &self.source.path)?;
        if let Some(url) = &self.repository.url {
            if url.trim().is_empty() {
                return Err(FieldError::new(
                    "repository.url",
                    "the repository URL is empty: give a restic repository (s3:host/bucket/prefix, rest:http://host/, /local/path) or leave repository out for the agent's local one",
                ));
            }
            if url.starts_with('-') || url.contains('\n') {
                return Err(FieldError::new(
                    "repository.url",
                    "the repository URL may not start with '-' or contain a newline",
                ));
            }
        }
        if let Some(r) = &self.repository.secret_ref {
            if self.repository.url.is_some() || self.repository.password.is_some() || !self.repository.env.is_empty() {
                return Err(FieldError::new(
                    "repository.secretRef",
                    "the repository comes from the Secret: leave url, password and env out",
                ));
            }
            if !is_dns_subdomain(&r.namespace) || !is_dns_subdomain(&r.name) {
                return Err(FieldError::new("repository.secretRef", "namespace and name must be Kubernetes names"));
            }
        }
        if let Some(id) = &self.repository.soda_profile {
            let r = &self.repository;
            if r.url.is_some() || r.password.is_some() || !r.env.is_empty() || r.secret_ref.is_some() {
                return Err(FieldError::new(
                    "repository.sodaProfile",
                    "the repository comes from the SODA profile: leave url, password, env and secretRef out",
                ));
            }
            let ok = !id.is_empty()
                && id.len() <= 255
                && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(FieldError::new(
                    "repository.sodaProfile",
                    "a SODA profile id is 1 to 255 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        if let Some(pw) = &self.repository.password {
            if pw.is_empty() {
                return Err(FieldError::new("repository.password", "the repository password may not be empty"));
            }
        }
        for key in self.repository.env.keys() {
            let well_formed = !key.is_empty()
                && key.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                && !key.starts_with(|c: char| c.is_ascii_digit());
            if !well_formed || !ALLOWED_ENV_PREFIXES.iter().any(|p| key.starts_with(p)) {
                return Err(FieldError::new(
                    format!("repository.env.{key}"),
                    format!(
                        "{key:?} is not an allowed repository variable: use storage credentials starting with {}",
                        ALLOWED_ENV_PREFIXES.join(", ")
                    ),
                ));
            }
        }
        let schedules = self.schedules()?;
        let gap = schedules.backup.min_gap(now);
        // Compared as u64: a jitter of 2^63 or more cast to i64 would pass as negative.
        if self.jitter_seconds > gap.num_seconds().max(0) as u64 {
            return Err(FieldError::new(
                "jitterSeconds",
                format!(
                    "jitter ({} s) may not exceed the time between two runs ({} s)",
                    self.jitter_seconds,
                    gap.num_seconds()
                ),
            ));
        }
        self.retention.validate()?;
        if let (Some(d), Some(s)) = (&self.drill, &schedules.drill) {
            if d.jitter_seconds > s.min_gap(now).num_seconds().max(0) as u64 {
                return Err(FieldError::new("drill.jitterSeconds", "may not exceed the time between two drills"));
            }
            if d.sample_files > 100_000 {
                return Err(FieldError::new("drill.sampleFiles", "at most 100000 files (0 means every file)"));
            }
            if d.max_bytes < 1 << 20 {
                return Err(FieldError::new("drill.maxBytes", "at least 1048576 bytes (1 MiB)"));
            }
        }
        if self.consistency.max_freeze_ms == 0 || self.consistency.max_freeze_ms > 600_000 {
            return Err(FieldError::new("consistency.maxFreezeMs", "must be between 1 and 600000 milliseconds"));
        }
        for (i, hook) in self.consistency.hooks.pre.iter().chain(&self.consistency.hooks.post).enumerate() {
            if hook.is_empty() || hook[0].is_empty() {
                return Err(FieldError::new(
                    format!("consistency.hooks[{i}]"),
                    "a hook is a non-empty argv array, e.g. [\"/usr/bin/sync\"]",
                ));
            }
        }
        for (i, e) in self.exclude.iter().enumerate() {
            if e.is_empty() || e.contains('\n') || e.contains('\0') {
                return Err(FieldError::new(
                    format!("exclude[{i}]"),
                    "an exclude pattern must be non-empty and on one line",
                ));
            }
        }
        for (i, t) in self.tags.iter().enumerate() {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | ':' | '/'));
            if !ok {
                return Err(FieldError::new(
                    format!("tags[{i}]"),
                    format!("{t:?} is not a valid tag: use letters, digits and - _ . = : /"),
                ));
            }
            if RESERVED_TAG_PREFIXES.iter().any(|p| t.starts_with(p)) {
                return Err(FieldError::new(
                    format!("tags[{i}]"),
                    format!("{t:?} is reserved for the agent's own tags"),
                ));
            }
        }
        Ok(schedules)
    }

    /// The repository URL, which the agent has filled in by the time a
    /// policy is stored.
    /// What identifies the repository (for its maintenance bookkeeping):
    /// its URL, or the Secret or SODA profile that names it.
    pub fn repository_url(&self) -> std::borrow::Cow<'_, str> {
        match (&self.repository.url, &self.repository.secret_ref, &self.repository.soda_profile) {
            (Some(u), _, _) => u.as_str().into(),
            (None, Some(r), _) => format!("secret:{}/{}", r.namespace, r.name).into(),
            (None, None, Some(p)) => format!("soda-profile:{p}").into(),
            (None, None, None) => "".into(),
        }
    }
}

/// Apply an RFC 7396 JSON merge patch to `target`.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> Result<PolicySpec, serde_json::Error> {
        serde_json::from_value(v)
    }
    fn base() -> serde_json::Value {
        json!({"name": "orders-db", "source": {"path": "/data"}, "schedule": {"intervalSeconds": 3600}})
    }

    #[test]
    fn a_minimal_policy_is_valid() {
        let s = spec(base()).unwrap();
        assert!(s.validate(Utc::now()).is_ok());
        assert_eq!(s.consistency.mode, ConsistencyMode::None);
        assert!(s.retention.keeps_everything());
    }

    #[test]
    fn unknown_fields_are_refused_but_read_only_ones_tolerated() {
        let mut v = base();
        v["colour"] = json!("red");
        assert!(spec(v).unwrap_err().to_string().contains("unknown field `colour`"));
        let mut v = base();
        v["id"] = json!("abc");
        v["createdAt"] = json!("2026-01-01T00:00:00Z");
        v["repository"] = json!({"url": "/r", "password": null, "passwordSet": true});
        assert!(spec(v).is_ok());
    }

    #[test]
    fn append_only_is_off_unless_asked_and_round_trips_as_append_only() {
        assert!(!spec(base()).unwrap().append_only);
        let mut v = base();
        v["appendOnly"] = json!(true);
        let s = spec(v).unwrap();
        assert!(s.append_only);
        assert_eq!(serde_json::to_value(&s).unwrap()["appendOnly"], true);
        let mut v = base();
        v["appendonly"] = json!(true);
        assert!(spec(v).is_err(), "the camelCase spelling only");
        let mut v = base();
        v["maintenanceLease"] = json!("soda-syncer-maint-0123456789abcdef");
        assert!(spec(v).is_ok(), "a GET's read-only maintenanceLease can be PUT back");
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        let cases = [
            (json!({"name": "-bad"}), "name"),
            (json!({"name": ""}), "name"),
            (json!({"source": {"path": "relative/dir"}}), "source.path"),
            (json!({"source": {"path": "/data/../etc"}}), "source.path"),
            (json!({"repository": {"url": " "}}), "repository.url"),
            (json!({"repository": {"url": "--option=x"}}), "repository.url"),
            (json!({"repository": {"url": "/r", "env": {"LD_PRELOAD": "x"}}}), "repository.env.LD_PRELOAD"),
            (
                json!({"repository": {"url": "/r", "env": {"RESTIC_PASSWORD_COMMAND": "x"}}}),
                "repository.env.RESTIC_PASSWORD_COMMAND",
            ),
            (json!({"jitterSeconds": 3601}), "jitterSeconds"),
            (json!({"retention": {"keepLast": 100001}}), "retention.keepLast"),
            (json!({"tags": ["policy=x"]}), "tags[0]"),
            (json!({"tags": ["a,b"]}), "tags[0]"),
            (json!({"exclude": [""]}), "exclude[0]"),
            (json!({"consistency": {"maxFreezeMs": 0}}), "consistency.maxFreezeMs"),
            (json!({"repository": {"sodaProfile": "p1", "url": "/r"}}), "repository.sodaProfile"),
            (
                json!({"repository": {"sodaProfile": "p1", "secretRef": {"namespace": "a", "name": "b"}}}),
                "repository.sodaProfile",
            ),
            (json!({"repository": {"sodaProfile": "a/b"}}), "repository.sodaProfile"),
            (json!({"repository": {"sodaProfile": ""}}), "repository.sodaProfile"),
        ];
        for (patch, field) in cases {
            let mut v = base();
            merge_patch(&mut v, &patch);
            let err = spec(v).unwrap().validate(Utc::now()).unwrap_err();
            assert_eq!(err.field, field, "{patch}");
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn a_soda_profile_names_the_repository_alone() {
        let mut v = base();
        v["repository"] = json!({"sodaProfile": "1106b972-66ef-11e7-b172-db03f3689c9c"});
        let s = spec(v).unwrap();
        assert!(s.validate(Utc::now()).is_ok());
        assert_eq!(s.repository_url(), "soda-profile:1106b972-66ef-11e7-b172-db03f3689c9c");
        assert_eq!(serde_json::to_value(&s).unwrap()["repository"], json!({"sodaProfile": s.repository.soda_profile}));
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let mut v = base();
        v["repository"] = json!({"url": "/r", "password": "hunter2", "env": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}});
        let s = spec(v).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("s3cr3t"), "{dbg}");
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        merge_patch(&mut t, &json!({"x": [1]}));
        assert_eq!(t["x"], json!([1]));
    }
}

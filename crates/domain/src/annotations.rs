//! Opting a PersistentVolumeClaim into backups with annotations, no CRD.
//!
//! A claim is backed up when it, or its StorageClass, carries
//! `soda-syncer.io/backup: "true"`, or when a SODA profile is named for it
//! (`soda-syncer.io/profile`, or the StorageClass parameter `profile` of a
//! `soda-csi` class). Every other key is optional; a key on the claim
//! overrides the same key on its class, so an operator sets defaults once per
//! class and teams adjust one claim at a time. A claim can opt out of an
//! opted-in class with `soda-syncer.io/backup: "false"`.

use std::collections::BTreeMap;

use crate::field::{is_dns_subdomain, FieldError};
use crate::policy::{ConsistencyMode, ConsistencySpec};
use crate::retention::Retention;
use crate::schedule::ScheduleSpec;

/// The prefix of every key the agent reads or writes.
pub const PREFIX: &str = "soda-syncer.io/";

/// Keys a user writes (on the claim or its StorageClass).
pub mod keys {
    /// `"true"` opts in, `"false"` opts out (ParseBool spellings).
    pub const BACKUP: &str = "soda-syncer.io/backup";
    /// An interval (`3600`, `90m`, `6h`, `1d`) or a five-field cron line.
    pub const SCHEDULE: &str = "soda-syncer.io/schedule";
    /// IANA time zone for a cron schedule.
    pub const TIMEZONE: &str = "soda-syncer.io/timezone";
    /// Seconds of random delay per run.
    pub const JITTER: &str = "soda-syncer.io/jitter-seconds";
    /// `keepLast=7,keepDaily=14,keepWithin=48h` (the API's retention fields).
    pub const RETENTION: &str = "soda-syncer.io/retention";
    /// `none | auto | btrfs | reflink | blockclone | fsfreeze | lvm`.
    pub const CONSISTENCY: &str = "soda-syncer.io/consistency";
    /// `"true"`: fail rather than back up a live volume.
    pub const CONSISTENCY_REQUIRED: &str = "soda-syncer.io/consistency-required";
    pub const MAX_FREEZE_MS: &str = "soda-syncer.io/max-freeze-ms";
    /// A Secret in the claim's namespace with `RESTIC_REPOSITORY`,
    /// `RESTIC_PASSWORD` and the storage keys (`AWS_ACCESS_KEY_ID`, ...).
    pub const SECRET: &str = "soda-syncer.io/secret";
    /// Comma-separated restic exclude patterns.
    /// `true`: the repository refuses the node's deletes; retention is the maintainer's.
    pub const APPEND_ONLY: &str = "soda-syncer.io/append-only";
    pub const EXCLUDE: &str = "soda-syncer.io/exclude";
    /// A SODA profile id: its repository and schedule are the policy.
    pub const PROFILE: &str = "soda-syncer.io/profile";
}

/// Keys the agent writes on the claim; users should not.
pub mod status_keys {
    pub const POLICY: &str = "soda-syncer.io/policy-id";
    pub const NODE: &str = "soda-syncer.io/node";
    pub const LAST_BACKUP_TIME: &str = "soda-syncer.io/last-backup-time";
    pub const LAST_BACKUP_STATE: &str = "soda-syncer.io/last-backup-state";
    pub const LAST_SNAPSHOT: &str = "soda-syncer.io/last-snapshot-id";
    pub const LAST_ERROR: &str = "soda-syncer.io/last-error";
    pub const NEXT_BACKUP_TIME: &str = "soda-syncer.io/next-backup-time";
    /// Why the claim is opted in but not backed up (block mode, bad annotation, ...).
    pub const STATUS: &str = "soda-syncer.io/status";
    /// The policy's name (the id is in `POLICY`).
    pub const POLICY_NAME: &str = "soda-syncer.io/policy-name";
    /// The end of the last clean backup (RFC 3339).
    pub const LAST_SUCCESS_TIME: &str = "soda-syncer.io/last-success-time";
    /// When the next successful backup is due, as the agent's
    /// `soda_syncer_policy_backup_deadline_timestamp_seconds` (RFC 3339).
    pub const BACKUP_DEADLINE: &str = "soda-syncer.io/backup-deadline";
    /// The point-in-time method the last backup used (`btrfs`, `fsfreeze`,
    /// `none`, ...); `soda-syncer.io/consistency` is the mode a user asks for.
    pub const CONSISTENCY_USED: &str = "soda-syncer.io/consistency-used";
}

/// Application hooks, on a **pod** (Velero's shape, our prefix): a command
/// run in one of its containers through `pods/exec` before the volume's
/// snapshot (`pre.`) and after it (`post.`).
pub mod pod_keys {
    /// A JSON array argv, e.g. `["/bin/sh","-c","sync"]` (no shell is added).
    pub const PRE_COMMAND: &str = "pre.hook.soda-syncer.io/command";
    /// The container to run it in; default: the pod's first container.
    pub const PRE_CONTAINER: &str = "pre.hook.soda-syncer.io/container";
    /// Seconds, or `30s` / `2m`; default 30 s. Past it the hook has failed.
    pub const PRE_TIMEOUT: &str = "pre.hook.soda-syncer.io/timeout";
    /// `Fail` (default: the backup fails) or `Continue` (a warning on the run).
    pub const PRE_ON_ERROR: &str = "pre.hook.soda-syncer.io/on-error";
    pub const POST_COMMAND: &str = "post.hook.soda-syncer.io/command";
    pub const POST_CONTAINER: &str = "post.hook.soda-syncer.io/container";
    pub const POST_TIMEOUT: &str = "post.hook.soda-syncer.io/timeout";
    pub const POST_ON_ERROR: &str = "post.hook.soda-syncer.io/on-error";
    /// The common ending of the hook keys' prefixes.
    pub const SUFFIX: &str = "hook.soda-syncer.io/";
}

/// A hook's timeout when none is annotated.
pub const DEFAULT_HOOK_TIMEOUT_SECONDS: u64 = 30;

/// What a failed hook does to the backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HookOnError {
    #[default]
    Fail,
    Continue,
}

/// One application hook of a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodHook {
    pub command: Vec<String>,
    /// `None`: the pod's first container.
    pub container: Option<String>,
    pub timeout_seconds: u64,
    pub on_error: HookOnError,
}

/// A pod's `pre` and `post` hooks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PodHooks {
    pub pre: Option<PodHook>,
    pub post: Option<PodHook>,
}

/// Read a pod's hook annotations. A key that cannot be understood (or a
/// container, timeout or on-error without a command) is an error naming it.
pub fn parse_pod_hooks(a: &BTreeMap<String, String>) -> Result<PodHooks, FieldError> {
    use pod_keys::*;
    let one = |command: &str, container: &str, timeout: &str, on_error: &str| -> Result<Option<PodHook>, FieldError> {
        let get = |k: &str| a.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let Some(cmd) = get(command) else {
            if let Some(k) = [container, timeout, on_error].into_iter().find(|k| get(k).is_some()) {
                return Err(FieldError::new(k, format!("is set but {command} is not")));
            }
            return Ok(None);
        };
        let argv: Vec<String> = serde_json::from_str(cmd).map_err(|_| {
            FieldError::new(
                command,
                format!("{cmd:?} is not a JSON array of strings, e.g. [\"/bin/sh\",\"-c\",\"sync\"]"),
            )
        })?;
        if argv.is_empty() || argv[0].is_empty() {
            return Err(FieldError::new(command, "the command is empty"));
        }
        let container_name = get(container).map(str::to_string);
        if let Some(c) = &container_name {
            if !is_dns_subdomain(c) || c.contains('.') || c.len() > 63 {
                return Err(FieldError::new(container, format!("{c:?} is not a container name")));
            }
        }
        let timeout_seconds = match get(timeout) {
            None => DEFAULT_HOOK_TIMEOUT_SECONDS,
            Some(v) => match parse_duration(timeout, v)? {
                0 => return Err(FieldError::new(timeout, "the timeout must be more than 0 seconds")),
                n => n,
            },
        };
        let on_error = match get(on_error) {
            None => HookOnError::Fail,
            Some(v) if v.eq_ignore_ascii_case("fail") => HookOnError::Fail,
            Some(v) if v.eq_ignore_ascii_case("continue") => HookOnError::Continue,
            Some(v) => return Err(FieldError::new(on_error, format!("{v:?} is neither Fail nor Continue"))),
        };
        Ok(Some(PodHook { command: argv, container: container_name, timeout_seconds, on_error }))
    };
    Ok(PodHooks {
        pre: one(PRE_COMMAND, PRE_CONTAINER, PRE_TIMEOUT, PRE_ON_ERROR)?,
        post: one(POST_COMMAND, POST_CONTAINER, POST_TIMEOUT, POST_ON_ERROR)?,
    })
}

/// The interval used when a claim opts in without a schedule.
pub const DEFAULT_INTERVAL_SECONDS: u64 = 3600;

/// What the annotations ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct OptIn {
    pub schedule: ScheduleSpec,
    pub jitter_seconds: u64,
    pub retention: Retention,
    pub append_only: bool,
    pub consistency: ConsistencySpec,
    pub exclude: Vec<String>,
    /// The Secret (in the claim's namespace) with the repository keys;
    /// `None`: the agent's default repository (or the profile's).
    pub secret: Option<String>,
    pub profile: Option<String>,
}

/// Read the claim's and its class's annotations (claim wins per key), plus
/// the class's `profile` parameter when its provisioner is `soda-csi`.
/// `Ok(None)`: not opted in. An annotation that cannot be understood is an
/// error naming it, so the operator sees it on the claim rather than a
/// silently skipped volume.
pub fn parse(
    claim: &BTreeMap<String, String>,
    class: &BTreeMap<String, String>,
    class_profile: Option<&str>,
) -> Result<Option<OptIn>, FieldError> {
    let get = |k: &str| claim.get(k).or_else(|| class.get(k)).map(|v| v.trim()).filter(|v| !v.is_empty());
    let profile = get(keys::PROFILE).map(str::to_string).or_else(|| class_profile.map(str::to_string));
    let enabled = match get(keys::BACKUP) {
        Some(v) => parse_bool(keys::BACKUP, v)?,
        None => profile.is_some(),
    };
    if !enabled {
        return Ok(None);
    }
    let schedule = match get(keys::SCHEDULE) {
        None => ScheduleSpec { interval_seconds: Some(DEFAULT_INTERVAL_SECONDS), ..Default::default() },
        Some(v) if v.split_whitespace().count() >= 5 => ScheduleSpec {
            cron: Some(v.to_string()),
            timezone: get(keys::TIMEZONE).map(str::to_string),
            ..Default::default()
        },
        Some(v) => ScheduleSpec { interval_seconds: Some(parse_duration(keys::SCHEDULE, v)?), ..Default::default() },
    };
    let jitter_seconds = match get(keys::JITTER) {
        Some(v) => parse_duration(keys::JITTER, v)?,
        None => 0,
    };
    let retention = match get(keys::RETENTION) {
        Some(v) => parse_retention(v)?,
        None => Retention::default(),
    };
    let append_only = match get(keys::APPEND_ONLY) {
        Some(v) => parse_bool(keys::APPEND_ONLY, v)?,
        None => false,
    };
    let mut consistency = ConsistencySpec::default();
    if let Some(v) = get(keys::CONSISTENCY) {
        consistency.mode = serde_json::from_value(serde_json::Value::String(v.to_ascii_lowercase())).map_err(|_| {
            FieldError::new(
                keys::CONSISTENCY,
                format!("{v:?} is not a mode: use none, auto, btrfs, reflink, blockclone, fsfreeze or lvm"),
            )
        })?;
    }
    if let Some(v) = get(keys::CONSISTENCY_REQUIRED) {
        consistency.required = parse_bool(keys::CONSISTENCY_REQUIRED, v)?;
    }
    if let Some(v) = get(keys::MAX_FREEZE_MS) {
        consistency.max_freeze_ms = v
            .parse()
            .map_err(|_| FieldError::new(keys::MAX_FREEZE_MS, format!("{v:?} is not a number of milliseconds")))?;
    }
    let exclude = get(keys::EXCLUDE)
        .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let secret = get(keys::SECRET).map(str::to_string);
    if let Some(s) = &secret {
        if !is_dns_subdomain(s) {
            return Err(FieldError::new(keys::SECRET, format!("{s:?} is not a Secret name")));
        }
    }
    if consistency.mode == ConsistencyMode::None && consistency.required {
        return Err(FieldError::new(
            keys::CONSISTENCY_REQUIRED,
            "consistency is required but the mode is none: set soda-syncer.io/consistency to auto or a method",
        ));
    }
    Ok(Some(OptIn { schedule, jitter_seconds, retention, append_only, consistency, exclude, secret, profile }))
}

/// Go's `strconv.ParseBool` spellings, as K8up accepts them.
pub fn parse_bool(key: &str, v: &str) -> Result<bool, FieldError> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(FieldError::new(key, format!("{v:?} is not a boolean: use \"true\" or \"false\""))),
    }
}

/// Seconds, or a number with one unit among s, m, h, d (`90m`, `6h`).
pub fn parse_duration(key: &str, v: &str) -> Result<u64, FieldError> {
    let err =
        || FieldError::new(key, format!("{v:?} is not a duration: use seconds or a number with s, m, h or d (6h)"));
    let (num, mult) = match v.char_indices().last() {
        Some((i, 's')) => (&v[..i], 1),
        Some((i, 'm')) => (&v[..i], 60),
        Some((i, 'h')) => (&v[..i], 3600),
        Some((i, 'd')) => (&v[..i], 86_400),
        _ => (v, 1),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(mult).ok_or_else(err)
}

/// `keepLast=7,keepDaily=14,keepWithin=48h`.
fn parse_retention(v: &str) -> Result<Retention, FieldError> {
    let mut map = serde_json::Map::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, val)) = part.split_once('=') else {
            return Err(FieldError::new(keys::RETENTION, format!("{part:?} is not key=value (e.g. keepDaily=7)")));
        };
        let (k, val) = (k.trim(), val.trim());
        let value = if k == "keepWithin" {
            serde_json::Value::String(val.to_string())
        } else {
            let n: u32 =
                val.parse().map_err(|_| FieldError::new(keys::RETENTION, format!("{k}: {val:?} is not a count")))?;
            serde_json::Value::from(n)
        };
        map.insert(k.to_string(), value);
    }
    let r: Retention = serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| {
        FieldError::new(
            keys::RETENTION,
            format!("{e}; use keepLast, keepHourly, keepDaily, keepWeekly, keepMonthly, keepYearly or keepWithin"),
        )
    })?;
    r.validate().map_err(|e| FieldError::new(keys::RETENTION, e.message))?;
    Ok(r)
}

/// The name of the policy made for a claim: `<namespace>-<claim>`, cut to
/// the policy name limit with a hash so two long names never collide.
pub fn policy_name(namespace: &str, claim: &str, hash: impl Fn(&str) -> String) -> String {
    let full = format!("{namespace}-{claim}");
    if full.len() <= crate::policy::MAX_NAME_LEN {
        return full;
    }
    let h = hash(&full);
    let keep = crate::policy::MAX_NAME_LEN - h.len() - 1;
    let head = full[..keep].trim_end_matches(['-', '.']);
    format!("{head}-{h}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_append_only_annotation_is_a_boolean_on_the_claim_or_its_class() {
        let on = parse(&m(&[(keys::BACKUP, "true")]), &m(&[(keys::APPEND_ONLY, "true")]), None).unwrap().unwrap();
        assert!(on.append_only);
        let off = parse(&m(&[(keys::BACKUP, "true")]), &m(&[]), None).unwrap().unwrap();
        assert!(!off.append_only);
        let e = parse(&m(&[(keys::BACKUP, "true"), (keys::APPEND_ONLY, "sometimes")]), &m(&[]), None).unwrap_err();
        assert_eq!(e.field, keys::APPEND_ONLY);
    }

    #[test]
    fn nothing_means_not_opted_in() {
        assert_eq!(parse(&m(&[]), &m(&[]), None).unwrap(), None);
        assert_eq!(parse(&m(&[(keys::SCHEDULE, "1h")]), &m(&[]), None).unwrap(), None);
    }

    #[test]
    fn claim_overrides_its_class_key_by_key() {
        let class = m(&[(keys::BACKUP, "true"), (keys::SCHEDULE, "6h"), (keys::CONSISTENCY, "auto")]);
        let claim = m(&[(keys::SCHEDULE, "30m"), (keys::SECRET, "repo-keys")]);
        let o = parse(&claim, &class, None).unwrap().unwrap();
        assert_eq!(o.schedule.interval_seconds, Some(1800));
        assert_eq!(o.consistency.mode, ConsistencyMode::Auto);
        assert_eq!(o.secret.as_deref(), Some("repo-keys"));
        // A claim opts out of an opted-in class.
        assert_eq!(parse(&m(&[(keys::BACKUP, "false")]), &class, None).unwrap(), None);
    }

    #[test]
    fn a_profile_opts_in_and_cron_schedules_are_recognised() {
        let o = parse(&m(&[(keys::SCHEDULE, "0 */6 * * *"), (keys::TIMEZONE, "Europe/Berlin")]), &m(&[]), Some("p1"))
            .unwrap()
            .unwrap();
        assert_eq!(o.profile.as_deref(), Some("p1"));
        assert_eq!(o.schedule.cron.as_deref(), Some("0 */6 * * *"));
        assert_eq!(o.schedule.timezone.as_deref(), Some("Europe/Berlin"));
        let o = parse(&m(&[(keys::BACKUP, "true")]), &m(&[]), None).unwrap().unwrap();
        assert_eq!(o.schedule.interval_seconds, Some(DEFAULT_INTERVAL_SECONDS));
    }

    #[test]
    fn retention_and_excludes_parse() {
        let o = parse(
            &m(&[
                (keys::BACKUP, "1"),
                (keys::RETENTION, "keepLast=3, keepWithin=48h"),
                (keys::EXCLUDE, "*.tmp, cache/"),
            ]),
            &m(&[]),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(o.retention.keep_last, Some(3));
        assert_eq!(o.retention.keep_within.as_deref(), Some("48h"));
        assert_eq!(o.exclude, vec!["*.tmp", "cache/"]);
    }

    #[test]
    fn bad_annotations_name_the_key() {
        for (k, v) in [
            (keys::BACKUP, "yes please"),
            (keys::SCHEDULE, "often"),
            (keys::RETENTION, "keepForever=1"),
            (keys::RETENTION, "keepLast"),
            (keys::CONSISTENCY, "magic"),
            (keys::SECRET, "Not_A_Name"),
            (keys::MAX_FREEZE_MS, "-1"),
        ] {
            let mut claim = m(&[(keys::BACKUP, "true")]);
            claim.insert(k.to_string(), v.to_string());
            let e = parse(&claim, &m(&[]), None).unwrap_err();
            assert_eq!(e.field, k, "{v}");
        }
    }

    #[test]
    fn pod_hooks_parse_with_defaults() {
        assert_eq!(parse_pod_hooks(&m(&[])).unwrap(), PodHooks::default());
        let h = parse_pod_hooks(&m(&[
            (pod_keys::PRE_COMMAND, r#"["/bin/sh","-c","sync"]"#),
            (pod_keys::POST_COMMAND, r#"["/bin/true"]"#),
            (pod_keys::POST_CONTAINER, "db"),
            (pod_keys::POST_TIMEOUT, "2m"),
            (pod_keys::POST_ON_ERROR, "Continue"),
        ]))
        .unwrap();
        let pre = h.pre.unwrap();
        assert_eq!(pre.command, vec!["/bin/sh", "-c", "sync"]);
        assert_eq!((pre.container, pre.timeout_seconds, pre.on_error), (None, 30, HookOnError::Fail));
        let post = h.post.unwrap();
        assert_eq!(post.container.as_deref(), Some("db"));
        assert_eq!((post.timeout_seconds, post.on_error), (120, HookOnError::Continue));
        let h = parse_pod_hooks(&m(&[(pod_keys::PRE_COMMAND, r#"["x"]"#), (pod_keys::PRE_TIMEOUT, "45")])).unwrap();
        assert_eq!(h.pre.unwrap().timeout_seconds, 45);
    }

    #[test]
    fn bad_pod_hook_annotations_name_the_key() {
        let cmd = (pod_keys::PRE_COMMAND, r#"["/bin/true"]"#);
        for (pairs, key) in [
            (vec![(pod_keys::PRE_COMMAND, "/bin/sh -c sync")], pod_keys::PRE_COMMAND),
            (vec![(pod_keys::POST_COMMAND, "[]")], pod_keys::POST_COMMAND),
            (vec![(pod_keys::PRE_COMMAND, r#"["a", 1]"#)], pod_keys::PRE_COMMAND),
            (vec![cmd, (pod_keys::PRE_TIMEOUT, "soon")], pod_keys::PRE_TIMEOUT),
            (vec![cmd, (pod_keys::PRE_TIMEOUT, "0")], pod_keys::PRE_TIMEOUT),
            (vec![cmd, (pod_keys::PRE_ON_ERROR, "Ignore")], pod_keys::PRE_ON_ERROR),
            (vec![cmd, (pod_keys::PRE_CONTAINER, "Bad_Name")], pod_keys::PRE_CONTAINER),
            (vec![(pod_keys::POST_TIMEOUT, "10s")], pod_keys::POST_TIMEOUT),
        ] {
            let e = parse_pod_hooks(&m(&pairs)).unwrap_err();
            assert_eq!(e.field, key, "{pairs:?}");
        }
    }

    #[test]
    fn long_names_are_cut_with_a_hash() {
        let n = policy_name(&"a".repeat(40), &"b".repeat(40), |_| "0123abcd".into());
        assert!(n.len() <= crate::policy::MAX_NAME_LEN);
        assert!(n.ends_with("-0123abcd"));
        assert_eq!(policy_name("db", "data-0", |_| unreachable!()), "db-data-0");
        assert!(crate::policy::validate_name(&n).is_ok());
    }
}

//! The API's request bodies built from the command's flags: a policy to
//! create, a merge patch to edit one.

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use std::path::Path;

use super::{CreateArgs, EditArgs, KeepFlags, ScheduleFlags};

impl ScheduleFlags {
    /// The `schedule` object, if a schedule was given; in a merge patch
    /// the other kind's fields are cleared.
    fn json(&self, patch: bool) -> Option<Value> {
        let clear = |v: &mut Value, keys: &[&str]| {
            if patch {
                for k in keys {
                    v[*k] = Value::Null;
                }
            }
        };
        match (self.interval, &self.cron) {
            (Some(i), _) => {
                let mut v = json!({ "intervalSeconds": i });
                clear(&mut v, &["cron", "timezone"]);
                Some(v)
            }
            (None, Some(c)) => {
                let mut v = json!({ "cron": c });
                if let Some(tz) = &self.timezone {
                    v["timezone"] = json!(tz);
                } else {
                    clear(&mut v, &["timezone"]);
                }
                clear(&mut v, &["intervalSeconds"]);
                Some(v)
            }
            _ => None,
        }
    }
}

impl KeepFlags {
    fn json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        for (k, v) in [
            ("keepLast", self.keep_last),
            ("keepHourly", self.keep_hourly),
            ("keepDaily", self.keep_daily),
            ("keepWeekly", self.keep_weekly),
            ("keepMonthly", self.keep_monthly),
            ("keepYearly", self.keep_yearly),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        if let Some(w) = &self.keep_within {
            m.insert("keepWithin".into(), json!(w));
        }
        m
    }
}

pub(super) fn edit_patch(a: &EditArgs) -> anyhow::Result<Value> {
    if let Some(f) = &a.file {
        return read_json_file(f);
    }
    let mut patch = serde_json::Map::new();
    if let Some(schedule) = a.schedule.json(true) {
        patch.insert("schedule".into(), schedule);
    }
    if let Some(j) = a.schedule.jitter {
        patch.insert("jitterSeconds".into(), json!(j));
    }
    let retention = a.keep.json();
    if !retention.is_empty() {
        patch.insert("retention".into(), Value::Object(retention));
    }
    if let Some(src) = &a.source {
        patch.insert("source".into(), json!({ "path": src }));
    }
    if patch.is_empty() {
        bail!("nothing to change: give --file or a flag such as --interval");
    }
    Ok(Value::Object(patch))
}

pub(super) fn create_body(a: &CreateArgs) -> anyhow::Result<Value> {
    if let Some(f) = &a.file {
        return read_json_file(f);
    }
    let schedule = a.schedule.json(false).ok_or_else(|| anyhow!("give --interval SECONDS or --cron EXPR"))?;
    let mut body = json!({
        "name": a.name,
        "source": { "path": a.source },
        "schedule": schedule,
        "exclude": a.exclude,
        "tags": a.tag,
        "paused": a.paused,
        "retention": Value::Object(a.keep.json()),
    });
    if let Some(j) = a.schedule.jitter {
        body["jitterSeconds"] = json!(j);
    }
    let mut repo = serde_json::Map::new();
    if let Some(url) = &a.repo {
        repo.insert("url".into(), json!(url));
        let pw = match &a.password_file {
            Some(f) => std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the password file {}", f.display()))?
                .trim_end_matches('\n')
                .to_string(),
            None => std::env::var("RESTIC_PASSWORD").map_err(|_| {
                anyhow!("--repo needs a password: --password-file FILE or RESTIC_PASSWORD in the environment")
            })?,
        };
        repo.insert("password".into(), json!(pw));
    }
    let mut env = serde_json::Map::new();
    for k in &a.env_from {
        let v = std::env::var(k).map_err(|_| anyhow!("--env-from {k}: {k} is not set in your environment"))?;
        env.insert(k.clone(), json!(v));
    }
    if !env.is_empty() {
        repo.insert("env".into(), Value::Object(env));
    }
    if !repo.is_empty() {
        body["repository"] = Value::Object(repo);
    }
    Ok(body)
}

/// A JSON body from the file `f` ("-": standard input).
fn read_json_file(f: &Path) -> anyhow::Result<Value> {
    let text = if f.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", f.display()))
}

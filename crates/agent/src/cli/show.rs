//! What the commands print: JSON, YAML, or tables for people on a
//! terminal (see `crate::output`).

use serde_json::Value;

use super::Output;

pub(super) fn print_preview(p: &Value) {
    let n = |k: &str| p[k].as_u64().unwrap_or(0);
    eprintln!(
        "the restore would overwrite {} files, restore {} missing, delete {}, leave {} unchanged ({} bytes to write)",
        n("filesToOverwrite"),
        n("filesToRestore"),
        n("filesToDelete"),
        n("filesUnchanged"),
        n("bytesToWrite")
    );
    for (key, label) in [("overwrite", "overwrite"), ("restore", "restore"), ("delete", "delete")] {
        for item in p[key].as_array().into_iter().flatten() {
            eprintln!("  {label:9} {}", item.as_str().unwrap_or_default());
        }
    }
    if p["truncated"].as_bool() == Some(true) {
        eprintln!("  (more not listed)");
    }
}

pub(super) fn print_value(out: Output, v: &Value, table: impl FnOnce(&Value)) {
    match out {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Yaml => print!("{}", to_yaml(v)),
        Output::Table => table(v),
    }
}

/// YAML for a JSON value, as people write it: plain keys, strings quoted
/// only where YAML would otherwise read them as something else.
pub fn to_yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_else(|e| format!("# cannot print as YAML: {e}\n"))
}

pub(super) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn print_policies(out: Output, v: &Value) {
    if out == Output::Json {
        return print_value(out, v, |_| {});
    }
    let rows = v["policies"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| {
                    let sched = if let Some(i) = p["schedule"]["intervalSeconds"].as_u64() {
                        format!("every {i}s")
                    } else {
                        s(&p["schedule"]["cron"])
                    };
                    let state =
                        if p["paused"].as_bool() == Some(true) { "paused".to_string() } else { "active".to_string() };
                    vec![
                        s(&p["id"]),
                        s(&p["name"]),
                        s(&p["origin"]),
                        s(&p["source"]["path"]),
                        sched,
                        state,
                        s(&p["nextRunAt"]),
                        s(&p["lastRun"]["state"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    crate::output::table(&["ID", "NAME", "ORIGIN", "SOURCE", "SCHEDULE", "STATE", "NEXT RUN", "LAST RUN"], rows);
}

pub(super) fn print_status(v: &Value) {
    println!("node      {}  (soda-syncer {}, up {} s)", s(&v["node"]), s(&v["version"]), s(&v["uptimeSeconds"]));
    let r = &v["restic"];
    let features = r["features"].as_array().map(|f| f.iter().map(s).collect::<Vec<_>>().join(", ")).unwrap_or_default();
    println!(
        "restic    {} ({}); newer features in use: {}",
        if r["version"].is_null() { "not found".to_string() } else { s(&r["version"]) },
        s(&r["support"]),
        if features.is_empty() { "none".to_string() } else { features }
    );
    if !r["message"].is_null() {
        println!("          {}", s(&r["message"]));
    }
    let sync = &v["sodaSync"];
    if sync.is_null() {
        println!("SODA sync off (no --soda-endpoint, or Kubernetes off)");
        return;
    }
    let or = |x: &Value, none: &str| if x.is_null() { none.to_string() } else { s(x) };
    println!("SODA      {}", s(&sync["endpoint"]));
    println!(
        "sync      {}  (leader {}, this agent {})",
        s(&sync["state"]),
        or(&sync["leader"], "none"),
        s(&sync["identity"])
    );
    if !sync["pendingChanges"].is_null() {
        println!(
            "pending   {} changes, lag {} s; last pass {} ({} ms), last success {}",
            s(&sync["pendingChanges"]),
            s(&sync["lagSeconds"]),
            or(&sync["lastPassAt"], "never"),
            or(&sync["lastPassMs"], "-"),
            or(&sync["lastSuccessAt"], "never")
        );
    }
    let p = &sync["profiles"];
    println!(
        "profiles  {} (last poll that worked {}{})",
        s(&p["count"]),
        or(&p["lastSuccessAt"], "never"),
        if p["failing"] == true { "; failing now" } else { "" }
    );
    for (what, e) in [("sync", &sync["lastError"]), ("poll", &p["lastError"])] {
        if !e.is_null() {
            println!("last {what} error  {} {}: {}", s(&e["at"]), s(&e["code"]), s(&e["message"]));
        }
    }
}

pub(super) fn print_snapshots(v: &Value) {
    let rows = v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|sn| {
                    let tags: Vec<String> =
                        sn["tags"].as_array().map(|t| t.iter().map(s).collect()).unwrap_or_default();
                    let paths: Vec<String> =
                        sn["paths"].as_array().map(|t| t.iter().map(s).collect()).unwrap_or_default();
                    vec![
                        s(&sn["shortId"]),
                        s(&sn["time"]).chars().take(19).collect(),
                        s(&sn["hostname"]),
                        paths.join(","),
                        tags.join(","),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    crate::output::table(&["ID", "TIME", "HOST", "PATHS", "TAGS"], rows);
}

pub(super) fn print_runs(v: &Value) {
    let rows = v["runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    let snap: String = s(&r["snapshotId"]).chars().take(8).collect();
                    let policy = if r["policyName"].is_string() { &r["policyName"] } else { &r["policyId"] };
                    vec![
                        s(&r["id"]),
                        s(policy),
                        s(&r["kind"]),
                        s(&r["trigger"]),
                        // "unchanged since snapshot X, verified at T": the snapshot column names X,
                        // the state how it was proven (a walk, or a btrfs generation).
                        match r["unchanged"]["proof"].as_str() {
                            Some(proof) => format!("unchanged ({proof})"),
                            None if r["unchanged"].is_object() => "unchanged".to_string(),
                            None => s(&r["state"]),
                        },
                        s(&r["startedAt"]),
                        s(&r["finishedAt"]),
                        snap,
                        s(&r["error"]["code"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    crate::output::table(
        &["ID", "POLICY", "KIND", "TRIGGER", "STATE", "STARTED", "FINISHED", "SNAPSHOT", "ERROR"],
        rows,
    );
}

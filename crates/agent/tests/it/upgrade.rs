//! Upgrades lose nothing: state directories written by released agents
//! (`tests/fixtures/state/schema-<N>/`, recorded by
//! `scripts/record-state-fixture` with the binary of that schema) open with
//! this agent, with every policy, sealed secret and run intact; a database
//! from a newer schema is refused, untouched, with what to do.

use crate::support::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/state");
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    all.sort();
    assert!(!all.is_empty(), "no recorded state directories in {}", dir.display());
    all
}

/// A copy of a recorded state directory, as the agent left it.
fn state_from(fixture: &Path, into: &Path) -> PathBuf {
    let state = into.join("state");
    std::fs::create_dir_all(&state).unwrap();
    for f in ["state.db", "secrets.key"] {
        // Schema 1 kept secrets in the clear: it has no key.
        if fixture.join(f).exists() {
            std::fs::copy(fixture.join(f), state.join(f)).unwrap();
        }
    }
    state
}

/// Fields of a policy that the agent stores (what it computes at each
/// start, such as the next run time and the status, may differ).
const STORED_POLICY_FIELDS: &[&str] = &[
    "id",
    "name",
    "origin",
    "source",
    "repository",
    "schedule",
    "retention",
    "consistency",
    "exclude",
    "tags",
    "jitterSeconds",
    "paused",
    "pausedByUser",
    "createdAt",
    "volume",
    "secretsUnavailable",
];

#[tokio::test(flavor = "multi_thread")]
async fn state_written_by_every_recorded_schema_opens_with_every_policy_secret_and_run_intact() {
    for fixture in fixtures() {
        let name = fixture.file_name().unwrap().to_string_lossy().to_string();
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap()).unwrap();
        let sealed = fixture.join("secrets.key").exists();
        let raw = std::fs::read(fixture.join("state.db")).unwrap();
        assert_eq!(
            !raw.windows(b"fixture-password".len()).any(|w| w == b"fixture-password"),
            sealed,
            "{name}: a recorded database with a key holds no password in the clear (one without, schema 1, does)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let state = state_from(&fixture, tmp.path());
        // The recorded repositories and volumes are gone: a run after the
        // upgrade (a retry of the failed policy) only adds records, which
        // the comparison below allows; for the same reason the failure
        // count is not compared.
        let agent = AgentProc::start(&state, &["--kubelet-dir", tmp.path().join("kubelet").to_str().unwrap()]).unwrap();
        let policies = agent.get("/v1/policies").await["policies"].as_array().cloned().unwrap();
        let want = expected["policies"].as_array().unwrap();
        assert_eq!(policies.len(), want.len(), "{name}: {policies:#?}");
        for w in want {
            let got = policies
                .iter()
                .find(|p| p["id"] == w["id"])
                .unwrap_or_else(|| panic!("{name}: policy {} ({}) is gone after the upgrade", w["id"], w["name"]));
            for field in STORED_POLICY_FIELDS {
                // A policy made for a CSI volume is paused by the agent
                // while that volume is absent, as the recorded one is here
                // (`pausedByUser` still tells an operator's pause apart).
                let computed = *field == "paused" && !w["volume"].is_null();
                if w.get(*field).is_some() && !computed {
                    assert_eq!(got[*field], w[*field], "{name}: policy {} field {field}", w["name"]);
                }
            }
            assert_eq!(
                got["secretsUnavailable"],
                Value::Null,
                "{name}: the sealed secrets of {} did not open",
                w["name"]
            );
            assert_eq!(got["repository"]["passwordSet"], true, "{name}: {got}");
        }
        let runs = agent.get("/v1/runs?limit=1000").await["runs"].as_array().cloned().unwrap();
        for w in expected["runs"].as_array().unwrap() {
            let got =
                runs.iter().find(|r| r["id"] == w["id"]).unwrap_or_else(|| panic!("{name}: run {} is gone", w["id"]));
            // Every recorded field is there with its value; a newer agent may add fields.
            for (k, v) in w.as_object().unwrap() {
                assert_eq!(&got[k], v, "{name}: run {} field {k}", w["id"]);
            }
        }
        // Still the agent's own: the database takes writes after the upgrade.
        let (st, body) =
            agent.call("POST", &format!("/v1/policies/{}/pause", want[0]["id"].as_str().unwrap()), None).await;
        assert!(st < 300, "{name}: {st} {body}");
        // Secrets an older agent kept in the clear are sealed now, and no
        // copy of them is left in the database's free pages or its log.
        let mut agent = agent;
        assert!(agent.terminate().success(), "{name}: the agent did not stop cleanly");
        for f in ["state.db", "state.db-wal"] {
            let raw = std::fs::read(state.join(f)).unwrap_or_default();
            assert!(
                !raw.windows(b"fixture-password".len()).any(|w| w == b"fixture-password"),
                "{name}: {f} holds a password in the clear after the upgrade"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_from_a_newer_schema_is_refused_untouched_with_what_to_do() {
    let fixture = fixtures().pop().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let state = state_from(&fixture, tmp.path());
    let db = state.join("state.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
    }
    let before = std::fs::read(&db).unwrap();
    let mut agent = AgentProc::start_without_waiting(&state, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent kept running on a newer database; log:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    let log = agent.log_text();
    assert!(
        log.contains("schema version 999") && log.contains("newer soda-syncer") && log.contains("knows versions up to"),
        "{log}"
    );
    assert!(log.contains("left as it is"), "{log}");
    assert!(std::fs::read(&db).unwrap() == before, "the newer database was changed");
    let ls: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("state.db-"))
        .collect();
    let wal = state.join("state.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0, "{ls:?}");
}

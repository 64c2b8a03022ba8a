//! The SODA sync's state on this agent, as `GET /v1/status`, the metrics
//! and `soda-syncer status` show it: who leads, how far behind SODA is, the
//! last error, and the profile polls. One board per agent, made when the
//! sync starts and shared by the sync, the profile poller and the HTTP side.

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::soda::SodaError;

/// The SODA sync's state on this agent.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SodaSyncStatus {
    /// The SODA API server.
    pub endpoint: String,
    /// This agent's identity in the sync Lease (its pod name, else its node).
    pub identity: String,
    /// The holder of the Lease `soda-syncer-soda-sync` as last seen: the
    /// one agent that pushes Kubernetes to SODA (null: nobody, or not known yet).
    pub leader: Option<String>,
    /// `following` (another agent leads), `starting` (leading, before the
    /// first pass), `ok` (the last pass worked), `failing` (the last pass
    /// failed: SODA or the API server away).
    pub state: SyncState,
    /// Leader only: the last pass, its end, how long it took.
    pub last_pass_at: Option<DateTime<Utc>>,
    pub last_pass_ms: Option<u64>,
    /// Leader only: the end of the last pass that worked.
    pub last_success_at: Option<DateTime<Utc>>,
    /// Leader only: changes not yet in SODA: steps the last pass could not
    /// do (refused, or SODA still creating or deleting), plus claim and PV
    /// changes seen since the last pass that worked began.
    pub pending_changes: Option<u64>,
    /// Leader only: the age of the oldest of those changes, in seconds (0: none).
    pub lag_seconds: Option<u64>,
    /// The last error of a pass or of one step (kept after it clears: compare
    /// its time with `lastSuccessAt`).
    pub last_error: Option<SyncErrorView>,
    /// SODA's profiles, polled by every agent.
    pub profiles: ProfilePollStatus,
    /// Errors so far by kind (the metric `soda_syncer_soda_sync_errors_total`).
    #[serde(skip)]
    pub errors: BTreeMap<&'static str, u64>,
    /// Since when a change has waited for SODA.
    #[serde(skip)]
    pub(super) dirty_since: Option<DateTime<Utc>>,
    /// Change events seen since the last pass that worked began.
    #[serde(skip)]
    pub(super) events: u64,
    /// Steps the last pass left undone.
    #[serde(skip)]
    pub(super) left: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    Following,
    Starting,
    Ok,
    Failing,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncErrorView {
    /// A fixed code (`soda_unavailable`, `soda_unauthorized`, `kube_unavailable`, ...).
    pub code: String,
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProfilePollStatus {
    /// Profiles SODA had at the last poll that worked.
    pub count: usize,
    pub last_success_at: Option<DateTime<Utc>>,
    /// The last poll failed (policies keep the last copy).
    pub failing: bool,
    pub last_error: Option<SyncErrorView>,
}

/// The board the sync and the poller write and `/v1/status` reads.
#[derive(Clone)]
pub struct SodaStatusBoard {
    identity: Arc<str>,
    status: Arc<Mutex<SodaSyncStatus>>,
}

impl SodaStatusBoard {
    /// `endpoint` is shown as given: pass it with any password redacted.
    pub fn new(endpoint: String, identity: String) -> SodaStatusBoard {
        let status = SodaSyncStatus {
            endpoint,
            identity: identity.clone(),
            leader: None,
            state: SyncState::Following,
            last_pass_at: None,
            last_pass_ms: None,
            last_success_at: None,
            pending_changes: None,
            lag_seconds: None,
            last_error: None,
            profiles: ProfilePollStatus::default(),
            errors: BTreeMap::new(),
            dirty_since: None,
            events: 0,
            left: 0,
        };
        SodaStatusBoard { identity: identity.into(), status: Arc::new(Mutex::new(status)) }
    }

    /// This agent's identity in the sync Lease (its pod name, else its node).
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SodaSyncStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The status now, with the leader's backlog and lag computed.
    pub fn snapshot(&self) -> SodaSyncStatus {
        let mut st = self.lock().clone();
        let leading = st.state != SyncState::Following;
        st.pending_changes = leading.then_some(st.left + st.events);
        st.lag_seconds = leading.then(|| st.dirty_since.map_or(0, |t| (Utc::now() - t).num_seconds().max(0) as u64));
        st
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut SodaSyncStatus)) {
        f(&mut self.lock())
    }

    /// Change events seen since the last pass that worked began.
    pub(super) fn events(&self) -> u64 {
        self.lock().events
    }

    /// A sync or poll error: recorded as the last one and counted by kind.
    pub(super) fn record_error(&self, kind: &'static str, message: String) {
        self.update(|st| {
            *st.errors.entry(kind).or_default() += 1;
            st.last_error = Some(error_view(kind, message));
        })
    }

    /// A profile poll's outcome (`Ok(count)` or the error).
    pub(super) fn record_poll(&self, result: Result<usize, &SodaError>) {
        self.update(|st| match result {
            Ok(count) => {
                st.profiles.count = count;
                st.profiles.last_success_at = Some(Utc::now());
                st.profiles.failing = false;
            }
            Err(e) => {
                st.profiles.failing = true;
                st.profiles.last_error = Some(error_view(e.kind(), e.to_string()));
                *st.errors.entry(e.kind()).or_default() += 1;
            }
        })
    }
}

fn error_view(code: &str, message: String) -> SyncErrorView {
    SyncErrorView { code: code.to_string(), message, at: Utc::now() }
}

//! The policies service: the one way a policy is made, changed, paused,
//! resumed or removed, whoever asks (the API, the legacy route, a claim's
//! annotations, a SODA profile). Each spec goes through the one admission
//! path (`crate::admission`), is stored, and the run engine
//! (`crate::scheduler`) is told what changed.

use chrono::Utc;
use soda_syncer_domain::field::FieldError;
use soda_syncer_domain::policy::merge_patch;
use soda_syncer_domain::{Origin, PolicySpec};

use crate::admission::{admit, Admission, AdmissionError, Admitted};
use crate::config::Config;
use crate::scheduler::Scheduler;
use crate::store::{PolicyRecord, PolicyStatus, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the body does not describe a policy: {0}")]
    Body(String),
    #[error("{0}")]
    ManagedByKubernetes(String),
}

impl From<AdmissionError> for PolicyError {
    fn from(e: AdmissionError) -> Self {
        match e {
            AdmissionError::Invalid(f) => PolicyError::Invalid(f),
            m @ AdmissionError::ManagedByKubernetes { .. } => PolicyError::ManagedByKubernetes(m.to_string()),
        }
    }
}

impl From<FieldError> for PolicyError {
    fn from(e: FieldError) -> Self {
        PolicyError::Invalid(e)
    }
}

/// Policies, as a service the HTTP API, the legacy route and the
/// Kubernetes adapter share.
#[derive(Clone)]
pub struct Policies {
    store: Store,
    config: Config,
    engine: Scheduler,
}

impl Policies {
    pub fn new(store: Store, config: Config, engine: Scheduler) -> Policies {
        Policies { store, config, engine }
    }

    /// Validate and store a new policy; its first run is due at once (plus jitter).
    pub fn create(
        &self,
        spec: PolicySpec,
        origin: Origin,
        volume: Option<String>,
        legacy_key: Option<String>,
    ) -> Result<PolicyRecord, PolicyError> {
        let now = Utc::now();
        let admitted = admit(&self.config, Admission { spec, by: origin, existing: None }, now)?;
        let mut p = PolicyRecord::new(origin, admitted.spec, volume, legacy_key, now);
        self.store.insert_policy(&p)?;
        self.engine.schedules().admitted(&p.id, &p.spec, admitted.schedules);
        self.engine.reschedule(&mut p)?;
        tracing::info!(policy = %p.id, name = %p.spec.name, origin = origin.as_str(), "policy created");
        Ok(p)
    }

    /// Replace a policy's spec (PUT). Secrets left out keep their stored
    /// values, since a client never gets them back to send.
    pub fn replace(&self, id: &str, spec: PolicySpec, by: Origin) -> Result<PolicyRecord, PolicyError> {
        let mut p = self.store.get_policy(id)?;
        let now = Utc::now();
        let Admitted { spec, schedules } = admit(&self.config, Admission { spec, by, existing: Some(&p) }, now)?;
        let was_paused = p.spec.paused;
        let schedule_changed = spec.schedule != p.spec.schedule || spec.jitter_seconds != p.spec.jitter_seconds;
        p.spec = spec;
        p.secrets_error = None;
        p.updated_at = now;
        self.store.update_policy(&p)?;
        self.engine.schedules().admitted(&p.id, &p.spec, schedules);
        // An edit may move the source or change the method: copy afresh.
        crate::consistency::discard_kept(&p.id, self.engine.consistency());
        if p.spec.paused && !was_paused {
            self.engine.policy_paused(&p.id);
        }
        if schedule_changed || (was_paused && !p.spec.paused) || p.next_run_at.is_some() {
            self.engine.reschedule(&mut p)?;
        }
        Ok(p)
    }

    /// Apply an RFC 7396 merge patch (PATCH).
    pub fn patch(&self, id: &str, patch: &serde_json::Value) -> Result<PolicyRecord, PolicyError> {
        let p = self.store.get_policy(id)?;
        let mut current = serde_json::to_value(&p.spec).map_err(|e| PolicyError::Body(e.to_string()))?;
        // Secrets are not part of what a client sees; they come back below.
        if let Some(repo) = current.get_mut("repository").and_then(|r| r.as_object_mut()) {
            repo.remove("password");
            repo.remove("env");
        }
        merge_patch(&mut current, patch);
        let spec: PolicySpec = serde_json::from_value(current).map_err(|e| PolicyError::Body(e.to_string()))?;
        self.replace(id, spec, Origin::Api)
    }

    pub fn set_paused(&self, id: &str, paused: bool) -> Result<PolicyRecord, PolicyError> {
        let mut p = self.store.get_policy(id)?;
        if p.spec.paused == paused {
            return Ok(p);
        }
        p.spec.paused = paused;
        p.updated_at = Utc::now();
        self.store.update_policy(&p)?;
        if paused {
            self.engine.policy_paused(id);
            crate::consistency::discard_kept(id, self.engine.consistency());
        } else if p.next_run_at.is_some() || self.store.last_run_of(id)?.is_none_or(|r| r.state.is_terminal()) {
            self.engine.reschedule(&mut p)?;
        }
        tracing::info!(policy = %id, paused, "policy {}", if paused { "paused" } else { "resumed" });
        Ok(p)
    }

    pub fn delete(&self, id: &str) -> Result<(), PolicyError> {
        let p = self.store.get_policy(id)?;
        self.engine.policy_deleted(id);
        crate::consistency::discard_kept(id, self.engine.consistency());
        self.engine.metrics().policy_deleted(&p);
        self.store.delete_policy(id)?;
        tracing::info!(policy = %id, "policy deleted");
        Ok(())
    }

    /// The agent itself pauses (or resumes) a policy whose volume went away
    /// (or came back). The user's own `paused` is left alone.
    pub fn set_status(&self, id: &str, status: PolicyStatus, message: Option<String>) -> Result<(), PolicyError> {
        let mut p = self.store.get_policy(id)?;
        if p.status == status && p.status_message == message {
            return Ok(());
        }
        p.status = status;
        p.status_message = message;
        p.updated_at = Utc::now();
        self.store.update_policy(&p)?;
        if status == PolicyStatus::Active {
            self.engine.reschedule(&mut p)?;
        } else {
            self.engine.policy_paused(id);
            crate::consistency::discard_kept(id, self.engine.consistency());
        }
        Ok(())
    }
}

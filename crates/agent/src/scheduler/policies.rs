//! Creating, changing and removing policies: the checks that need the disk
//! (the source exists, lies under an allowed root), the agent's defaults
//! (the local repository), and the scheduler's reaction to each change.

use chrono::Utc;
use soda_syncer_domain::field::FieldError;
use soda_syncer_domain::location::{RepositoryLocation, REMOTE_SCHEMES};
use soda_syncer_domain::policy::merge_patch;
use soda_syncer_domain::{Origin, PolicySpec, Secret};
use std::path::Path;

use super::Scheduler;
use crate::config::Config;
use crate::ids::new_id;
use crate::store::{PolicyRecord, PolicyStatus, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Invalid(FieldError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the body does not describe a policy: {0}")]
    Body(String),
}

impl From<FieldError> for PolicyError {
    fn from(e: FieldError) -> Self {
        PolicyError::Invalid(e)
    }
}

/// Refuse a source outside `--allowed-root`, or reached through a symlink
/// below its root: resolved the way every run resolves it again (see
/// [`crate::beneath`]), so a policy the runs would refuse is refused now.
pub fn check_allowed(config: &Config, path: &Path) -> Result<(), FieldError> {
    crate::beneath::open_under(
        &config.allowed_roots_in_effect(),
        path,
        "choose a path below one of them, or start the agent with --allowed-root DIR",
    )
    .map(|_| ())
    .map_err(|e| FieldError::new("source.path", e.to_string()))
}

/// What this agent can honour: hooks only from the operator's allow list
/// (`--hook-allow`), and a consistency mode only where it applies to the
/// source as it is now (see `consistency::check_policy`). A mode that cannot
/// apply is refused, never silently replaced by a live, inconsistent backup.
pub fn check_supported(config: &Config, spec: &PolicySpec) -> Result<(), FieldError> {
    crate::consistency::check_policy(config, spec)
}

/// The source must be an existing directory under an allowed root.
pub fn check_source(config: &Config, path: &str) -> Result<(), FieldError> {
    let p = Path::new(path);
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(FieldError::new(
                "source.path",
                format!("{path} is not a directory; give the directory to back up"),
            ))
        }
        Err(_) => {
            return Err(FieldError::new(
                "source.path",
                format!("{path} does not exist on this node; give an existing directory"),
            ))
        }
    }
    check_allowed(config, p)
}

/// A local repository must lie below the state directory or a
/// `--repository-root`: the agent runs restic as root, so a repository path
/// is a place where it creates files (`restic init`). Relative paths are
/// refused (they would depend on the agent's working directory); `..` and
/// symlinks are resolved first, for the part of the path that exists.
pub fn check_repository(config: &Config, url: &str) -> Result<(), FieldError> {
    let field = |m: String| FieldError::new("repository.url", m);
    let path = match RepositoryLocation::parse(url) {
        RepositoryLocation::Rest(_) | RepositoryLocation::Remote(_) => return Ok(()),
        RepositoryLocation::Local(path) => path,
        RepositoryLocation::Relative(_) => {
            return Err(field(format!(
                "{url} is neither an absolute path nor a restic backend URL ({}...)",
                REMOTE_SCHEMES.join(", ")
            )))
        }
    };
    if path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(field(format!("{url}: give the repository's path without '..'")));
    }
    // The part that exists, resolved below its root without following a
    // link (as every run checks again); restic creates the rest.
    let roots = config.repository_roots_in_effect();
    match crate::beneath::open_existing_under(&roots, path, "") {
        Ok(_) => Ok(()),
        Err(crate::beneath::PathError::OutsideRoots { .. }) => {
            let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            Err(field(format!(
                "the local repository {url} is outside the repository roots ({}); put it below one of them, or start the agent with --repository-root DIR",
                roots.join(", ")
            )))
        }
        Err(e) => Err(field(format!("the local repository {url} was refused: {e}"))),
    }
}

impl Scheduler {
    /// Fill in the agent's defaults: a policy that names no repository uses
    /// the default one (the configured URL, or the local repository in the
    /// state directory, with its generated password).
    fn apply_defaults(&self, spec: &mut PolicySpec) -> Result<(), FieldError> {
        let config = self.config();
        if spec.repository.secret_ref.is_some() || spec.repository.soda_profile.is_some() {
            return Ok(()); // its keys are read from the Secret or SODA profile at each run
        }
        if spec.repository.url.is_none() {
            match &config.default_repository {
                Some(url) => spec.repository.url = Some(url.clone()),
                None => {
                    spec.repository.url = Some(config.local_repository().display().to_string());
                    if spec.repository.password.is_none() {
                        let pw = std::fs::read_to_string(config.local_repository_password_file()).map_err(|e| {
                            FieldError::new(
                                "repository",
                                format!("the local repository's password file cannot be read: {e}"),
                            )
                        })?;
                        spec.repository.password = Some(Secret::new(pw.trim()));
                    }
                }
            }
        }
        if spec.repository.password.is_none() {
            return Err(FieldError::new(
                "repository.password",
                "a repository password is required for this repository",
            ));
        }
        Ok(())
    }

    /// Validate and store a new policy; its first run is due at once (plus jitter).
    pub fn create_policy(
        &self,
        mut spec: PolicySpec,
        origin: Origin,
        volume: Option<String>,
        legacy_key: Option<String>,
    ) -> Result<PolicyRecord, PolicyError> {
        let now = Utc::now();
        spec.validate(now)?;
        if spec.repository.secret_ref.is_some() && origin != Origin::Kubernetes {
            return Err(FieldError::new(
                "repository.secretRef",
                "only policies made from Kubernetes annotations may reference a Secret; give url and password instead",
            )
            .into());
        }
        if spec.repository.soda_profile.is_some() && origin != Origin::Kubernetes {
            return Err(FieldError::new(
                "repository.sodaProfile",
                "only policies made from Kubernetes claims may reference a SODA profile; give url and password instead",
            )
            .into());
        }
        check_supported(self.config(), &spec)?;
        check_source(self.config(), &spec.source.path)?;
        self.apply_defaults(&mut spec)?;
        if let Some(url) = &spec.repository.url {
            check_repository(self.config(), url)?;
        }
        let mut p = PolicyRecord {
            id: new_id(),
            origin,
            spec,
            volume,
            legacy_key,
            status: PolicyStatus::Active,
            status_message: None,
            created_at: now,
            updated_at: now,
            last_slot: None,
            next_slot: None,
            next_run_at: None,
            consecutive_failures: 0,
            last_failed_at: None,
            secrets_error: None,
        };
        self.store().insert_policy(&p)?;
        self.reschedule(&mut p)?;
        tracing::info!(policy = %p.id, name = %p.spec.name, origin = origin.as_str(), "policy created");
        Ok(p)
    }

    /// Replace a policy's spec (PUT). Secrets left out keep their stored
    /// values, since a client never gets them back to send.
    pub fn replace_policy(&self, id: &str, mut spec: PolicySpec) -> Result<PolicyRecord, PolicyError> {
        let mut p = self.store().get_policy(id)?;
        let now = Utc::now();
        spec.validate(now)?;
        if spec.repository.secret_ref.is_some() && p.origin != Origin::Kubernetes {
            return Err(FieldError::new(
                "repository.secretRef",
                "only policies made from Kubernetes annotations may reference a Secret; give url and password instead",
            )
            .into());
        }
        if spec.repository.soda_profile.is_some() && p.origin != Origin::Kubernetes {
            return Err(FieldError::new(
                "repository.sodaProfile",
                "only policies made from Kubernetes claims may reference a SODA profile; give url and password instead",
            )
            .into());
        }
        check_supported(self.config(), &spec)?;
        check_source(self.config(), &spec.source.path)?;
        // A URL sent back as shown (its password redacted) means "unchanged".
        let shown = p.spec.repository.url.as_deref().map(soda_syncer_domain::secret::redact_url);
        let by_reference = spec.repository.secret_ref.is_some() || spec.repository.soda_profile.is_some();
        if !by_reference && (spec.repository.url.is_none() || spec.repository.url == shown) {
            spec.repository.url = p.spec.repository.url.clone();
        }
        if spec.repository.password.is_none() && spec.repository.url == p.spec.repository.url {
            spec.repository.password = p.spec.repository.password.clone();
        }
        for (k, v) in spec.repository.env.iter_mut() {
            if v.is_none() {
                *v = p.spec.repository.env.get(k).cloned().flatten();
            }
        }
        if p.secrets_error.is_some() {
            // The stored secrets are lost (secrets key replaced): they must come again.
            if spec.repository.url.as_deref().is_some_and(|u| u.contains(":***@")) {
                return Err(FieldError::new(
                    "repository.url",
                    "the stored secrets cannot be unsealed: give the repository URL again, with its password",
                )
                .into());
            }
            if spec.repository.password.is_none() {
                return Err(FieldError::new(
                    "repository.password",
                    "the stored secrets cannot be unsealed: give the repository password again",
                )
                .into());
            }
        }
        self.apply_defaults(&mut spec)?;
        if let Some(url) = &spec.repository.url {
            check_repository(self.config(), url)?;
        }
        let was_paused = p.spec.paused;
        let schedule_changed = spec.schedule != p.spec.schedule || spec.jitter_seconds != p.spec.jitter_seconds;
        p.spec = spec;
        p.secrets_error = None;
        p.updated_at = now;
        self.store().update_policy(&p)?;
        // An edit may move the source or change the method: copy afresh.
        crate::consistency::discard_kept(&p.id, self.store());
        if p.spec.paused && !was_paused {
            self.policy_paused(&p.id);
        }
        if schedule_changed || (was_paused && !p.spec.paused) || p.next_run_at.is_some() {
            self.reschedule(&mut p)?;
        }
        Ok(p)
    }

    /// Apply an RFC 7396 merge patch (PATCH).
    pub fn patch_policy(&self, id: &str, patch: &serde_json::Value) -> Result<PolicyRecord, PolicyError> {
        let p = self.store().get_policy(id)?;
        let mut current = serde_json::to_value(&p.spec).map_err(|e| PolicyError::Body(e.to_string()))?;
        // Secrets are not part of what a client sees; they come back below.
        if let Some(repo) = current.get_mut("repository").and_then(|r| r.as_object_mut()) {
            repo.remove("password");
            repo.remove("env");
        }
        merge_patch(&mut current, patch);
        let spec: PolicySpec = serde_json::from_value(current).map_err(|e| PolicyError::Body(e.to_string()))?;
        self.replace_policy(id, spec)
    }

    pub fn set_paused(&self, id: &str, paused: bool) -> Result<PolicyRecord, PolicyError> {
        let mut p = self.store().get_policy(id)?;
        if p.spec.paused == paused {
            return Ok(p);
        }
        p.spec.paused = paused;
        p.updated_at = Utc::now();
        self.store().update_policy(&p)?;
        if paused {
            self.policy_paused(id);
            crate::consistency::discard_kept(id, self.store());
        } else if p.next_run_at.is_some() || self.store().last_run_of(id)?.is_none_or(|r| r.state.is_terminal()) {
            self.reschedule(&mut p)?;
        }
        tracing::info!(policy = %id, paused, "policy {}", if paused { "paused" } else { "resumed" });
        Ok(p)
    }

    pub fn delete_policy(&self, id: &str) -> Result<(), PolicyError> {
        let p = self.store().get_policy(id)?;
        self.policy_deleted(id);
        crate::consistency::discard_kept(id, self.store());
        self.metrics().policy_deleted(&p);
        self.store().delete_policy(id)?;
        tracing::info!(policy = %id, "policy deleted");
        Ok(())
    }

    /// The agent itself pauses (or resumes) a policy whose volume went away
    /// (or came back). The user's own `paused` is left alone.
    pub fn set_status(&self, id: &str, status: PolicyStatus, message: Option<String>) -> Result<(), PolicyError> {
        let mut p = self.store().get_policy(id)?;
        if p.status == status && p.status_message == message {
            return Ok(());
        }
        p.status = status;
        p.status_message = message;
        p.updated_at = Utc::now();
        self.store().update_policy(&p)?;
        if status == PolicyStatus::Active {
            self.reschedule(&mut p)?;
        } else {
            self.policy_paused(id);
            crate::consistency::discard_kept(id, self.store());
        }
        Ok(())
    }
}

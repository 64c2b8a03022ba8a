//! The one place a policy is admitted. Whatever made it (the API, the
//! legacy call, a claim's annotations, a SODA profile) and whether it is new
//! or replaces one, a spec becomes a policy here, in this order: who may make
//! or change it (its origin), the pure rules of the domain (`validate`),
//! what this agent can honour (hooks, the consistency mode on the source as it
//! is now), the source under an allowed root, the stored secrets a client
//! left out, the agent's defaults (the repository), and the repository under
//! a repository root. Nothing else validates a policy; the scheduler and the
//! run paths take an admitted spec as it is (and check paths again at use,
//! see `beneath`).

use chrono::{DateTime, Utc};
use soda_syncer_domain::field::FieldError;
use soda_syncer_domain::location::{RepositoryLocation, REMOTE_SCHEMES};
use soda_syncer_domain::schedule::Schedules;
use soda_syncer_domain::{Origin, PolicySpec, Secret};
use std::path::Path;

use crate::config::Config;
use crate::store::PolicyRecord;

/// Why a spec was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    /// A policy made from a claim's annotations, changed through another way in.
    #[error("this policy is made from the soda-syncer.io/ annotations of the PersistentVolumeClaim {claim}: change the annotations (kubectl annotate pvc), or remove soda-syncer.io/backup to stop it")]
    ManagedByKubernetes { claim: String },
}

/// A spec to admit: who sends it, and the policy it replaces, if any.
pub struct Admission<'a> {
    pub spec: PolicySpec,
    pub by: Origin,
    pub existing: Option<&'a PolicyRecord>,
}

/// An admitted policy: its spec, valid, with the agent's defaults and the
/// secrets the client left out filled in, ready to store; and its parsed
/// schedules, which the run engine uses as they are.
pub struct Admitted {
    pub spec: PolicySpec,
    pub schedules: Schedules,
}

/// Admit a spec (see the module's doc).
pub fn admit(config: &Config, a: Admission<'_>, now: DateTime<Utc>) -> Result<Admitted, AdmissionError> {
    let Admission { mut spec, by, existing } = a;
    if let Some(p) = existing {
        may_change(p, by)?;
    }
    let schedules = spec.validate(now)?;
    let origin = existing.map_or(by, |p| p.origin);
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
    check_supported(config, &spec)?;
    check_source(config, &spec.source.path)?;
    if let Some(p) = existing {
        keep_stored_secrets(&mut spec, p)?;
    }
    apply_defaults(config, &mut spec)?;
    if let Some(url) = &spec.repository.url {
        check_repository(config, url)?;
    }
    Ok(Admitted { spec, schedules })
}

/// A policy made from a claim's annotations follows them: changing or
/// deleting it any other way would be undone at the next change of the
/// claim, so it is refused with the way to do it. Pausing and running it by
/// hand stay allowed.
pub fn may_change(p: &PolicyRecord, by: Origin) -> Result<(), AdmissionError> {
    if p.origin == Origin::Kubernetes && by != Origin::Kubernetes {
        let claim = p.legacy_key.as_deref().and_then(|k| k.strip_prefix("kube:")).unwrap_or("its claim");
        return Err(AdmissionError::ManagedByKubernetes { claim: claim.to_string() });
    }
    Ok(())
}

/// Secrets left out of a replacement keep their stored values, since a
/// client never gets them back to send; a URL sent back as shown (its
/// password redacted) means "unchanged".
fn keep_stored_secrets(spec: &mut PolicySpec, p: &PolicyRecord) -> Result<(), FieldError> {
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
            ));
        }
        if spec.repository.password.is_none() {
            return Err(FieldError::new(
                "repository.password",
                "the stored secrets cannot be unsealed: give the repository password again",
            ));
        }
    }
    Ok(())
}

/// Fill in the agent's defaults: a policy that names no repository uses
/// the default one (the configured URL, or the local repository in the
/// state directory, with its generated password).
fn apply_defaults(config: &Config, spec: &mut PolicySpec) -> Result<(), FieldError> {
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
        return Err(FieldError::new("repository.password", "a repository password is required for this repository"));
    }
    Ok(())
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
    crate::consistency::check_policy(&config.consistency(), spec)
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

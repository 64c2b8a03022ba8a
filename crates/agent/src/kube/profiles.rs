//! SODA → Kubernetes: SODA profiles as the policy source. Every agent (no
//! leader) polls SODA's profiles into memory (never the database) and
//! wakes the reconciler when one changed, so a claim that names a profile
//! (`soda-syncer.io/profile`, or the `profile` parameter of a `soda-csi`
//! StorageClass) gets its schedule, retention and repository from it within
//! one poll. SODA wins for policy: what the profile sets replaces the
//! claim's annotations; what it leaves unset keeps them.
//!
//! The repository's keys (`RESTIC_REPOSITORY`, `RESTIC_PASSWORD`, `AWS_*`)
//! are read again when each run starts, with one short try; when SODA is
//! down or slow the copy from the last poll is used, so a SODA outage never
//! delays or fails a backup whose profile was seen. They reach only the
//! restic child's environment (`Repo`).

use futures_util::future::BoxFuture;
use soda_syncer_domain::annotations::OptIn;
use soda_syncer_domain::run::RunError;
use soda_syncer_domain::schedule::ScheduleSpec;
use soda_syncer_domain::soda::{profile_policy, SodaProfile};
use soda_syncer_domain::SecretRef;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::soda_status::SodaStatusBoard;
use super::view::View;
use crate::restic::Repo;
use crate::scheduler::SecretSource;
use crate::soda::{SodaClient, SodaConfig, SodaError};

/// How long a run waits for a fresh copy of its profile before it uses the
/// polled one.
const RUN_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Problems (event reasons) that pause a claim's policy rather than keep
/// its last good settings running.
pub(super) const PAUSING: [&str; 2] = ["ProfileDeleted", "ProfileNotFound"];

#[derive(Default)]
struct State {
    /// At least one list succeeded.
    loaded: bool,
    by_id: BTreeMap<String, SodaProfile>,
    /// Every id and name listed since the start: a name missing now that
    /// was there before was deleted; one never seen is a typo.
    seen: HashSet<String>,
    /// The last poll got an answer.
    reachable: bool,
}

/// The profiles SODA had at the last poll.
pub struct Profiles {
    endpoint: String,
    poll: SodaClient,
    /// One try with a short timeout, for run starts.
    at_run: SodaClient,
    state: RwLock<State>,
}

/// A profile as the cache knows it.
#[derive(Debug)]
pub(super) enum Lookup {
    /// SODA has not answered yet since the agent started.
    NotLoaded,
    Found(SodaProfile),
    /// Listed before, gone now.
    Deleted,
    /// Never listed.
    Missing,
}

impl Profiles {
    /// From `--soda-endpoint` and the `OPENSDS_*` / `OS_*` variables.
    pub fn from_env(endpoint: &str) -> Result<Profiles, SodaError> {
        Profiles::new(SodaConfig::from_env(Some(endpoint))?)
    }

    pub fn new(config: SodaConfig) -> Result<Profiles, SodaError> {
        let mut quick = config.clone();
        quick.max_attempts = 1;
        quick.request_timeout = RUN_FETCH_TIMEOUT;
        let poll = SodaClient::new(config)?;
        Ok(Profiles { endpoint: poll.endpoint(), poll, at_run: SodaClient::new(quick)?, state: RwLock::default() })
    }

    /// The client the cluster-wide sync uses too (one token for both).
    pub(super) fn client(&self) -> &SodaClient {
        &self.poll
    }

    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A profile by id, or else by name when exactly one has it.
    pub(super) fn lookup(&self, key: &str) -> Lookup {
        let st = self.read();
        if !st.loaded {
            return Lookup::NotLoaded;
        }
        if let Some(p) = st.by_id.get(key) {
            return Lookup::Found(p.clone());
        }
        let mut named = st.by_id.values().filter(|p| p.name() == key);
        match (named.next(), named.next()) {
            (Some(p), None) => Lookup::Found(p.clone()),
            _ if st.seen.contains(key) => Lookup::Deleted,
            _ => Lookup::Missing,
        }
    }

    /// The id of the profile `key` names, if SODA has it now.
    pub(super) fn resolve_id(&self, key: &str) -> Option<String> {
        match self.lookup(key) {
            Lookup::Found(p) => Some(p.id().to_string()),
            _ => None,
        }
    }

    /// Whether the last poll got an answer.
    pub(super) fn reachable(&self) -> bool {
        self.read().reachable
    }

    /// List the profiles once. `Ok(true)`: something changed.
    async fn poll_once(&self, cancel: &CancellationToken) -> Result<bool, SodaError> {
        let listed = match self.poll.list_profiles(cancel).await {
            Ok(l) => l,
            Err(e) => {
                self.write().reachable = false;
                return Err(e);
            }
        };
        let by_id: BTreeMap<String, SodaProfile> =
            listed.into_iter().filter(|p| !p.id().is_empty()).map(|p| (p.id().to_string(), p)).collect();
        let mut st = self.write();
        st.reachable = true;
        let changed = !st.loaded || st.by_id != by_id;
        if changed {
            for p in by_id.values() {
                st.seen.insert(p.id().to_string());
                st.seen.insert(p.name().to_string());
            }
            let (old, new): (HashSet<&String>, HashSet<&String>) = (st.by_id.keys().collect(), by_id.keys().collect());
            let (added, removed) = (new.difference(&old).count(), old.difference(&new).count());
            tracing::info!(
                profiles = by_id.len(),
                added,
                removed,
                first = !st.loaded,
                "SODA profiles changed; applying them to the claims' policies"
            );
            st.by_id = by_id;
            st.loaded = true;
        }
        Ok(changed)
    }

    /// Poll every `every` until cancelled; a change wakes the reconciler.
    pub(super) async fn poll_loop(
        self: Arc<Self>,
        view: Arc<View>,
        every: Duration,
        status: SodaStatusBoard,
        cancel: CancellationToken,
    ) {
        let mut failing = false;
        loop {
            let polled = self.poll_once(&cancel).await;
            match &polled {
                Ok(_) => status.record_poll(Ok(self.read().by_id.len())),
                Err(SodaError::Cancelled { .. }) => {}
                Err(e) => status.record_poll(Err(e)),
            }
            match polled {
                Ok(changed) => {
                    if failing {
                        tracing::info!(endpoint = %self.endpoint, "SODA answers again; profiles are current");
                        failing = false;
                    }
                    if changed {
                        view.changed.notify_one();
                    }
                }
                Err(SodaError::Cancelled { .. }) => return,
                Err(e) => {
                    if !failing {
                        tracing::warn!(endpoint = %self.endpoint, error = %e, kind = e.kind(),
                            "cannot read SODA's profiles; policies keep the last copy, retrying every poll");
                    } else {
                        tracing::debug!(error = %e, "SODA still unavailable");
                    }
                    failing = true;
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// The repository of a profile, read now (one short try) or, when SODA
    /// does not answer, from the last poll.
    pub(super) async fn repository_now(&self, id: &str) -> Result<Repo, RunError> {
        let err = |code: &str, message: String| RunError { code: code.into(), message };
        let cancel = CancellationToken::new();
        let fresh = if self.reachable() {
            match tokio::time::timeout(RUN_FETCH_TIMEOUT, self.at_run.get_profile(id, &cancel)).await {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(SodaError::NotFound { .. })) => {
                    return Err(err(
                        "soda_profile_deleted",
                        format!("SODA profile {id:?} no longer exists; the claim's policy is paused at the next poll"),
                    ))
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} s", RUN_FETCH_TIMEOUT.as_secs())),
            }
        } else {
            Err("SODA did not answer the last poll".to_string())
        };
        let profile = match fresh {
            Ok(p) => {
                let mut st = self.write();
                st.seen.insert(p.name().to_string());
                st.by_id.insert(id.to_string(), p.clone());
                p
            }
            Err(why) => match self.read().by_id.get(id).cloned() {
                Some(p) => {
                    tracing::info!(profile = id, why = %why, "SODA unavailable at the run's start; using the profile as last polled");
                    p
                }
                None => {
                    return Err(err(
                        "soda_unavailable",
                        format!("cannot read SODA profile {id:?} from {} ({why}), and no copy of it was polled since the agent started", self.endpoint),
                    ))
                }
            },
        };
        let policy = profile_policy(&profile).map_err(|e| err("soda_profile_invalid", e.to_string()))?;
        let r = policy.repository;
        let Some(url) = r.url else {
            return Err(err(
                "soda_profile_invalid",
                format!("SODA profile {id:?} no longer names a repository (customProperties.RESTIC_REPOSITORY); the claim's policy follows at the next poll"),
            ));
        };
        Ok(Repo {
            url,
            password: r.password.unwrap_or_default(),
            env: r.env.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect(),
        })
    }
}

/// Repository keys from Secrets and from SODA profiles.
pub(super) struct Sources {
    pub secrets: super::secrets::Secrets,
    pub profiles: Arc<Profiles>,
}

impl SecretSource for Sources {
    fn repository<'a>(&'a self, r: &'a SecretRef) -> BoxFuture<'a, Result<Repo, RunError>> {
        self.secrets.repository(r)
    }
    fn profile_repository<'a>(&'a self, profile_id: &'a str) -> BoxFuture<'a, Result<Repo, RunError>> {
        Box::pin(self.profiles.repository_now(profile_id))
    }
}

/// What a claim's policy is, once its profile is applied.
#[derive(Debug)]
pub(super) enum Applied {
    /// The settings to use, and the profile whose repository to read at
    /// each run (`None`: the claim's Secret or the agent's default).
    Policy { opt_in: Box<OptIn>, soda_profile: Option<String> },
    /// Not applied: an Event reason and a message for the claim.
    Problem { reason: &'static str, message: String },
}

/// Apply the claim's profile (if any) to what its annotations ask for.
/// SODA wins for policy: the profile's schedule and retention replace the
/// annotations', and its repository replaces the Secret; what the profile
/// leaves unset keeps the annotations' value (or the default).
pub(super) fn apply(profiles: Option<&Profiles>, o: &OptIn) -> Applied {
    let Some(key) = o.profile.as_deref() else {
        return Applied::Policy { opt_in: Box::new(o.clone()), soda_profile: None };
    };
    let Some(profiles) = profiles else {
        if o.secret.is_some() {
            // No SODA: the Secret and the annotations, as before.
            return Applied::Policy { opt_in: Box::new(o.clone()), soda_profile: None };
        }
        return Applied::Problem {
            reason: "ProfileNotApplied",
            message: format!(
                "the claim names SODA profile {key:?}, but this agent has no SODA endpoint to read it from; name a Secret with soda-syncer.io/secret or configure --soda-endpoint"
            ),
        };
    };
    let profile = match profiles.lookup(key) {
        Lookup::Found(p) => p,
        Lookup::NotLoaded => {
            return Applied::Problem {
                reason: "ProfileNotApplied",
                message: format!(
                    "the claim names SODA profile {key:?}; waiting for SODA at {} to answer (a policy that runs keeps its settings)",
                    profiles.endpoint()
                ),
            }
        }
        Lookup::Deleted => {
            return Applied::Problem {
                reason: "ProfileDeleted",
                message: format!(
                    "SODA profile {key:?} was deleted: backups are paused until it is back or the claim names another profile"
                ),
            }
        }
        Lookup::Missing => {
            return Applied::Problem {
                reason: "ProfileNotFound",
                message: format!("SODA at {} has no profile {key:?} (by id or name)", profiles.endpoint()),
            }
        }
    };
    let policy = match profile_policy(&profile) {
        Ok(p) => p,
        Err(e) => {
            return Applied::Problem {
                reason: "ProfileInvalid",
                message: format!("{}: {} (the last good settings stay)", e.field, e.message),
            }
        }
    };
    let mut opt_in = o.clone();
    if let Some(schedule) = policy.schedule {
        if let ScheduleSpec { interval_seconds: Some(secs), .. } = &schedule {
            // An annotated jitter may not outgrow the profile's interval.
            opt_in.jitter_seconds = opt_in.jitter_seconds.min(*secs);
        }
        opt_in.schedule = schedule;
    }
    if !policy.retention.keeps_everything() {
        opt_in.retention = policy.retention;
    }
    opt_in.append_only |= policy.append_only;
    let soda_profile = policy.repository.url.is_some().then(|| profile.id().to_string());
    if soda_profile.is_some() {
        opt_in.secret = None;
    }
    Applied::Policy { opt_in: Box::new(opt_in), soda_profile }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soda::SodaAuth;
    use serde_json::json;
    use soda_syncer_domain::annotations::{self, keys};

    fn profiles(list: &[serde_json::Value]) -> Profiles {
        let cfg = SodaConfig::new("http://127.0.0.1:9", SodaAuth::NoAuth { tenant_id: "t".into() });
        let p = Profiles::new(cfg).unwrap();
        {
            let mut st = p.write();
            st.loaded = true;
            for v in list {
                let sp = SodaProfile(v.clone());
                st.seen.insert(sp.id().into());
                st.seen.insert(sp.name().into());
                st.by_id.insert(sp.id().into(), sp);
            }
        }
        p
    }

    fn opt_in(extra: &[(&str, &str)]) -> OptIn {
        let mut a: BTreeMap<String, String> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        a.insert(keys::PROFILE.into(), "gold".into());
        annotations::parse(&a, &BTreeMap::new(), None).unwrap().unwrap()
    }

    #[test]
    fn the_profile_wins_for_what_it_sets_and_the_annotations_keep_the_rest() {
        let p = profiles(&[json!({"id": "p1", "name": "gold", "customProperties": {
            "RESTIC_REPOSITORY": "s3:h/b", "RESTIC_PASSWORD": "pw", "TimeInterval": 600}})]);
        let o = opt_in(&[
            (keys::SCHEDULE, "6h"),
            (keys::JITTER, "900"),
            (keys::RETENTION, "keepLast=3"),
            (keys::SECRET, "s"),
        ]);
        let Applied::Policy { opt_in, soda_profile } = apply(Some(&p), &o) else { panic!() };
        assert_eq!(opt_in.schedule.interval_seconds, Some(600));
        assert_eq!(opt_in.jitter_seconds, 600, "jitter capped at the interval");
        assert_eq!(opt_in.retention.keep_last, Some(3), "the profile sets no retention");
        assert_eq!(soda_profile.as_deref(), Some("p1"), "found by name, stored by id");
        assert_eq!(opt_in.secret, None, "the profile's repository replaces the Secret");

        // A profile without a repository or schedule: the Secret and the annotations.
        let p = profiles(&[json!({"id": "p1", "name": "gold", "snapshotProperties": {"retention": {"number": 9}}})]);
        let Applied::Policy { opt_in, soda_profile } = apply(Some(&p), &o) else { panic!() };
        assert_eq!((opt_in.schedule.interval_seconds, opt_in.retention.keep_last), (Some(21600), Some(9)));
        assert_eq!((soda_profile, opt_in.secret.as_deref()), (None, Some("s")));
    }

    #[test]
    fn a_missing_profile_is_told_apart_from_a_deleted_one() {
        let p = profiles(&[json!({"id": "p1", "name": "gold"})]);
        p.write().by_id.clear();
        let reason = |o: &OptIn| match apply(Some(&p), o) {
            Applied::Problem { reason, .. } => reason,
            Applied::Policy { .. } => "applied",
        };
        assert_eq!(reason(&opt_in(&[])), "ProfileDeleted");
        let mut other = opt_in(&[]);
        other.profile = Some("silver".into());
        assert_eq!(reason(&other), "ProfileNotFound");
        p.write().loaded = false;
        assert_eq!(reason(&other), "ProfileNotApplied");
        assert!(PAUSING.contains(&"ProfileDeleted") && !PAUSING.contains(&"ProfileNotApplied"));
        // Without SODA a Secret still works; without either it is reported.
        let mut with_secret = opt_in(&[(keys::SECRET, "s")]);
        assert!(matches!(apply(None, &with_secret), Applied::Policy { soda_profile: None, .. }));
        with_secret.secret = None;
        assert!(matches!(apply(None, &with_secret), Applied::Problem { reason: "ProfileNotApplied", .. }));
    }

    #[test]
    fn an_invalid_profile_keeps_the_last_settings_and_hides_its_secrets() {
        let p = profiles(&[json!({"id": "p1", "name": "gold", "customProperties": {
            "RESTIC_REPOSITORY": "s3:h/b", "RESTIC_PASSWORD": "hunter22", "TimeInterval": "often"}})]);
        let Applied::Problem { reason, message } = apply(Some(&p), &opt_in(&[])) else { panic!() };
        assert_eq!(reason, "ProfileInvalid");
        assert!(message.contains("TimeInterval") && !message.contains("hunter22"), "{message}");
    }
}

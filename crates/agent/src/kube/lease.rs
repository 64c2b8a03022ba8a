//! One holder at a time across the cluster, with a coordination.k8s.io
//! Lease: the cluster-wide SODA sync has one leader, and each repository
//! one maintainer. The holder renews every third of the lease; another
//! agent takes over once a lease has not been renewed for its whole
//! duration (the holder died or lost the API server). Every write carries
//! the resourceVersion it read, so two agents racing for an expired lease
//! cannot both win: the loser gets 409 and stays a follower.

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    holder: String,
    duration: Duration,
    /// The holder the last `try_hold` saw (ours when it won).
    seen: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Written on the Lease with every renewal (a liveness Lease names its node).
    annotations: serde_json::Map<String, serde_json::Value>,
}

/// On a liveness Lease: the node whose agent holds it, so `soda-syncer
/// cluster` can tell which nodes have a live agent (the Lease is named by
/// the pod's host name, which is not the node's).
pub const NODE_ANNOTATION: &str = "soda-syncer.io/node";

fn micro(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

impl LeaseLock {
    pub fn new(client: kube::Client, namespace: &str, name: &str, holder: &str, duration: Duration) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            holder: holder.into(),
            duration,
            seen: Default::default(),
            annotations: Default::default(),
        }
    }

    /// Also write this annotation on the Lease.
    pub fn annotated(mut self, key: &str, value: &str) -> LeaseLock {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Who held the lease at the last `try_hold` (None: nobody, or not asked yet).
    pub fn last_holder(&self) -> Option<String> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn saw(&self, holder: Option<&str>) {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = holder.filter(|h| !h.is_empty()).map(str::to_string);
    }

    fn spec(&self, now: DateTime<Utc>, acquired: Option<String>, transitions: i64) -> Result<Lease, kube::Error> {
        let v = serde_json::json!({
            "metadata": { "name": self.name, "annotations": self.annotations },
            "spec": {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": self.duration.as_secs().max(1),
                "acquireTime": acquired.unwrap_or_else(|| micro(now)),
                "renewTime": micro(now),
                "leaseTransitions": transitions,
            }
        });
        serde_json::from_value(v).map_err(kube::Error::SerdeError)
    }

    /// One attempt to hold (or keep) the lease. `Ok(true)`: we hold it now.
    pub async fn try_hold(&self) -> Result<bool, kube::Error> {
        let now = Utc::now();
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = self.spec(now, None, 0)?;
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.saw(Some(&self.holder));
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = serde_json::to_value(&current.spec).unwrap_or_default();
        let holder = spec.get("holderIdentity").and_then(|v| v.as_str()).unwrap_or("");
        let renewed = spec
            .get("renewTime")
            .and_then(|v| v.as_str())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        let duration = spec.get("leaseDurationSeconds").and_then(|v| v.as_i64()).unwrap_or(15);
        let transitions = spec.get("leaseTransitions").and_then(|v| v.as_i64()).unwrap_or(0);
        let ours = holder == self.holder;
        let expired = renewed.is_none_or(|t| t + chrono::Duration::seconds(duration) < now) || holder.is_empty();
        if !ours && !expired {
            self.saw(Some(holder));
            return Ok(false);
        }
        let acquired = ours.then(|| spec.get("acquireTime").and_then(|v| v.as_str()).map(str::to_string)).flatten();
        let mut lease = self.spec(now, acquired, if ours { transitions } else { transitions + 1 })?;
        lease.metadata = ObjectMeta { resource_version: current.metadata.resource_version.clone(), ..lease.metadata };
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                if !ours {
                    tracing::info!(lease = %self.name, previous = holder, "took over an expired lease");
                }
                self.saw(Some(&self.holder));
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Keep trying to hold the lease; the receiver says whether we hold it.
    /// A failed renewal counts as lost only once the lease would have
    /// expired, so a blip of the API server does not flap the holder.
    /// The task ends after handing the lease back once `cancel` fires:
    /// await it (`JoinHandle`) so the hand-back happens before the process exits.
    pub fn run(self, cancel: CancellationToken) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let every = (self.duration / 3).max(Duration::from_millis(200));
            let mut last_held: Option<std::time::Instant> = None;
            loop {
                // kube's client retries 503s and 429s with backoff for a
                // minute or more: a renewal that takes longer than its
                // period counts as failed, so losing the lease is noticed in time.
                let held = match tokio::time::timeout(every, self.try_hold()).await {
                    Ok(Ok(h)) => {
                        last_held = h.then(std::time::Instant::now);
                        h
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {} ms", every.as_millis()),
                        };
                        tracing::warn!(lease = %self.name, error, "cannot renew the lease");
                        last_held.is_some_and(|t| t.elapsed() < self.duration)
                    }
                };
                // (A failed renewal leaves `last_held` as it was: the lease
                // counts as ours only until it would have expired.)
                tx.send_if_modified(|v| std::mem::replace(v, held) != held);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
            if tx.send_replace(false) {
                // Bounded: an unreachable API server must not hold up a stop
                // (the lease then expires on its own).
                let _ = tokio::time::timeout(Duration::from_secs(3), self.release()).await;
            }
        });
        (rx, task)
    }

    /// Wait (up to `patience`) until we hold the lease. `false`: another
    /// holder kept it, or the API server could not be asked.
    pub async fn acquire(&self, patience: Duration) -> bool {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match self.try_hold().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => tracing::warn!(lease = %self.name, error = %e, "cannot take the lease"),
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// On a clean stop, hand the lease back so another agent need not wait
    /// for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut current)) = self.api.get_opt(&self.name).await else { return };
        let ours = current.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.holder.as_str());
        if !ours {
            return;
        }
        if let Some(spec) = current.spec.as_mut() {
            // No holder: free for the next agent at once. The renewal time
            // stays, now the moment it was handed back, so a sweep can tell
            // how long ago (`sweep_host_leases`).
            spec.holder_identity = None;
            spec.renew_time =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(k8s_openapi::jiff::Timestamp::now()));
        }
        if let Err(e) = self.api.replace(&self.name, &PostParams::default(), &current).await {
            tracing::debug!(lease = %self.name, error = %e, "cannot release the lease; it expires on its own");
        }
    }
}

/// One Lease per repository around `restic init`, so the agents of two
/// nodes that get the same new repository at once (a shared legacy call, or
/// claims naming one Secret) do not both create it.
pub struct InitLeases {
    pub client: kube::Client,
    pub namespace: String,
    pub holder: String,
}

struct Held(LeaseLock);

impl Drop for Held {
    fn drop(&mut self) {
        let lock = self.0.clone();
        tokio::spawn(async move { lock.release().await });
    }
}

impl crate::restic::InitGuard for InitLeases {
    fn hold<'a>(
        &'a self,
        repo_key: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Option<Box<dyn std::any::Any + Send>>> {
        Box::pin(async move {
            let name = format!("soda-syncer-init-{}", &repo_key[..repo_key.len().min(16)]);
            let lock =
                LeaseLock::new(self.client.clone(), &self.namespace, &name, &self.holder, Duration::from_secs(60));
            if lock.acquire(Duration::from_secs(120)).await {
                Some(Box::new(Held(lock)) as Box<dyn std::any::Any + Send>)
            } else {
                tracing::warn!(lease = %name, "could not take the repository's init lease; initialising without it");
                None
            }
        })
    }
}

/// One maintainer per repository across the cluster: the first agent whose
/// scheduled prune or check comes takes the repository's Lease for a whole
/// maintenance period and renews it each time; the others skip theirs while
/// it holds. If the maintainer's node goes away, its Lease expires one
/// period later and the next agent takes over.
pub struct MaintainerLeases {
    pub client: kube::Client,
    pub namespace: String,
    pub holder: String,
    pub period: Duration,
}

impl crate::scheduler::Maintainership for MaintainerLeases {
    fn is_maintainer<'a>(&'a self, repo_key: &'a str) -> futures_util::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            let name = crate::scheduler::maintenance_lease_of_key(repo_key);
            let lock = LeaseLock::new(self.client.clone(), &self.namespace, &name, &self.holder, self.period);
            match lock.try_hold().await {
                Ok(held) => held,
                Err(e) => {
                    // Two maintainers are safe (restic's exclusive lock keeps
                    // their prunes apart), none is not.
                    tracing::warn!(lease = %name, error = %e, "cannot ask who maintains the repository; maintaining it");
                    true
                }
            }
        })
    }
}

/// How long an agent's liveness Lease lasts without renewal (renewed every
/// third of it).
pub const LIVENESS: Duration = Duration::from_secs(30);
/// Past its expiry, how much longer a liveness Lease must have gone
/// unrenewed before its host's locks are removed: room for clock skew
/// between nodes and for a restic child still being stopped.
pub(crate) const LIVENESS_GRACE: Duration = Duration::from_secs(30);

/// The Lease that says the agent on host `hostname` is alive; `hostname` is
/// what restic writes into its locks (the pod's host name).
pub fn host_lease_name(hostname: &str) -> String {
    let h: String = hostname
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' })
        .take(200)
        .collect();
    format!("{HOST_LEASE_PREFIX}{}", h.trim_matches(|c| c == '-' || c == '.'))
}

/// This agent's liveness Lease, renewed while it runs and handed back on a
/// clean stop (after its restic children have ended). Once held, losing it
/// (no renewal for its whole duration: the API server unreachable, or
/// someone else took the name) fences restic on this node until it is
/// held again: other nodes may break this host's locks from 30 s after
/// that (the grace), by which time its restic commands have been stopped.
#[allow(clippy::too_many_arguments)]
pub fn keep_alive(
    client: kube::Client,
    namespace: &str,
    hostname: &str,
    node: &str,
    restic: crate::restic::Restic,
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: CancellationToken,
) {
    let name = host_lease_name(hostname);
    let lock = LeaseLock::new(client, namespace, &name, hostname, LIVENESS).annotated(NODE_ANNOTATION, node);
    let (mut held, renewer) = lock.run(cancel.clone());
    // In the agent's Kubernetes tasks, which a clean stop awaits after its
    // restic children have ended: the hand-back is the last thing it does.
    tasks.spawn(async move {
        let _ = renewer.await;
    });
    tasks.spawn(async move {
        let mut was_held = false;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = held.changed() => if changed.is_err() || cancel.is_cancelled() { break },
            }
            let now = *held.borrow_and_update();
            if now {
                restic.set_fenced(None);
            } else if was_held {
                restic.set_fenced(Some(format!(
                    "this node's liveness Lease {name} could not be renewed for {} s (is the Kubernetes API server reachable?), so other nodes may remove its repository locks; backups resume once it is renewed",
                    LIVENESS.as_secs()
                )));
            }
            was_held = now;
        }
    });
}

/// Answers restic's "is the agent behind this lock gone?" from the other
/// hosts' liveness Leases: gone when its Lease was handed back or has not
/// been renewed for its duration plus a grace. No Lease (an agent of an
/// older version, or restic run by hand): not provably gone.
pub struct HostLeases {
    pub api: Api<Lease>,
}

impl crate::restic::LockHolders for HostLeases {
    fn is_gone<'a>(&'a self, hostname: &'a str) -> futures_util::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            let lease = match self.api.get_opt(&host_lease_name(hostname)).await {
                Ok(Some(l)) => l,
                Ok(None) => return false,
                Err(e) => {
                    tracing::warn!(host = hostname, error = %e, "cannot read the host's liveness lease; its locks stay");
                    return false;
                }
            };
            let Some(spec) = lease.spec else { return false };
            let holder = spec.holder_identity.as_deref().unwrap_or("");
            if holder.is_empty() {
                return true; // handed back on a clean stop
            }
            if holder != hostname {
                return false; // someone else's Lease of that name: not ours to judge
            }
            let Some(renewed) = spec.renew_time else { return true };
            let lasts = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64) + LIVENESS_GRACE;
            renewed.0.as_second().saturating_add(lasts.as_secs() as i64) < Utc::now().timestamp()
        })
    }
}

/// A liveness Lease not renewed (or handed back) for this long belongs to
/// an agent gone for good: a pod replaced by a rollout, a node removed. By
/// then every lock its restic left is past restic's own 30-minute staleness
/// rule (a live restic refreshes its locks every 5 minutes), so the Lease
/// proves nothing more and is deleted; otherwise every pod that ever ran
/// would leave one behind.
pub const HOST_LEASE_KEEP: Duration = Duration::from_secs(3600);
const SWEEP_EVERY: Duration = Duration::from_secs(600);
pub(crate) const HOST_LEASE_PREFIX: &str = "soda-syncer-host-";

/// Delete, shortly after the start and then every 10 minutes, the liveness
/// Leases of agents gone for longer than `HOST_LEASE_KEEP`. Every agent
/// sweeps; each delete carries the resourceVersion it judged, so a Lease
/// renewed meanwhile (a host that came back) is left alone.
pub fn sweep_host_leases(
    api: Api<Lease>,
    own: String,
    tasks: &mut tokio::task::JoinSet<()>,
    cancel: CancellationToken,
) {
    tasks.spawn(async move {
        let mut wait = Duration::from_secs(5);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = SWEEP_EVERY;
            if let Err(e) = sweep_once(&api, &own, Utc::now().timestamp()).await {
                tracing::warn!(error = %e, "cannot sweep the liveness Leases of agents that are gone; trying again in 10 minutes");
            }
        }
    });
}

/// When a liveness Lease last showed its agent alive, in Unix seconds: its
/// renewal (or hand-back), else its acquisition, else its creation.
fn last_sign_of_life(lease: &Lease) -> Option<i64> {
    let spec = lease.spec.as_ref();
    spec.and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
        .map(|t| t.0.as_second())
        .or_else(|| lease.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()))
}

async fn sweep_once(api: &Api<Lease>, own: &str, now: i64) -> Result<(), kube::Error> {
    let own = host_lease_name(own);
    for lease in api.list(&kube::api::ListParams::default()).await?.items {
        let Some(name) = lease.metadata.name.as_deref() else { continue };
        if !name.starts_with(HOST_LEASE_PREFIX) || name == own {
            continue;
        }
        let Some(alive) = last_sign_of_life(&lease) else { continue };
        let silent = Duration::from_secs(now.saturating_sub(alive).max(0) as u64);
        if silent < HOST_LEASE_KEEP {
            continue;
        }
        let dp = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..Default::default()
        };
        match api.delete(name, &dp).await {
            Ok(_) => {
                tracing::info!(
                    lease = name,
                    silent_minutes = silent.as_secs() / 60,
                    "removed the liveness Lease of an agent gone for over an hour"
                );
            }
            // Renewed or removed meanwhile (another agent swept it).
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

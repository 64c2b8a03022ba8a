//! `GET /metrics`: one `prometheus-client` registry per router, encoded as
//! OpenMetrics text (ending in `# EOF`). It holds the scheduler's run
//! metrics, the consistency metrics, the HTTP request metrics counted by
//! [`track`], and a collector that reads the store at each scrape for the
//! per-policy gauges (next run, last success, backup deadline, paused), so
//! those stay present while a policy is paused or failing. Labels carry
//! policy ids and names, route templates and fixed codes: never a secret,
//! a repository URL or a raw request path.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::auth::Auth;
use super::ApiError;
use crate::metrics::{backup_deadline, schedule_period, PolicyLabels};
use crate::scheduler::Scheduler;
use crate::store::StoreError;

/// What Prometheus is told the body is (it asks for OpenMetrics first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the HTTP latency buckets, in seconds.
const HTTP_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route template (`/v1/policies/{id}`), or `unmatched`.
    route: String,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

/// The registry and the metrics the HTTP layer itself updates.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Requests whose body did not arrive within the read timeout.
    pub body_timeouts: Counter,
    scrape_error: Arc<Mutex<Option<StoreError>>>,
}

impl Metrics {
    pub fn new(state: &super::AppState) -> Metrics {
        let sched = &state.sched;
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::new_with_constructor(http_histogram as fn() -> Histogram);
        let body_timeouts = Counter::default();
        let scrape_error = Arc::new(Mutex::new(None));
        sched.metrics().register(&mut registry);
        sched.consistency().metrics.register(&mut registry);
        registry.register(
            "soda_syncer_http_requests",
            "HTTP requests answered, by route template, method and status code",
            requests.clone(),
        );
        registry.register_with_unit(
            "soda_syncer_http_request_duration",
            "Time to the response's headers, by route template",
            Unit::Seconds,
            duration.clone(),
        );
        registry.register(
            "soda_syncer_http_body_timeouts",
            "Requests refused with 408 because their body did not arrive within the read timeout",
            body_timeouts.clone(),
        );
        registry.register_collector(Box::new(StateCollector {
            sched: sched.clone(),
            store: state.store.clone(),
            restic: state.restic.clone(),
            deadline_grace: state.config.deadline_grace,
            auth: state.auth.clone(),
            soda: state.soda_sync.clone(),
            error: scrape_error.clone(),
        }));
        Metrics { registry, requests, duration, body_timeouts, scrape_error }
    }

    /// The whole exposition, or why the store could not be read.
    pub fn render(&self) -> Result<String, ApiError> {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            let err = self.scrape_error.lock().unwrap_or_else(|p| p.into_inner()).take();
            return Err(err
                .map(ApiError::from)
                .unwrap_or_else(|| ApiError::internal("the metrics could not be encoded")));
        }
        Ok(out)
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Count each request by its route template (never the raw path, whose ids
/// would make the label set unbounded) and status.
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned());
    let route = route.unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    m.duration.get_or_create(&RouteLabel { route: route.clone() }).observe(start.elapsed().as_secs_f64());
    m.requests.get_or_create(&RequestLabels { route, method, status: resp.status().as_u16() }).inc();
    resp
}

/// The Prometheus text format, for scrapers that do not ask for OpenMetrics
/// (curl piped into `promtool check metrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics handler's body: OpenMetrics when the `Accept` header names
/// it (Prometheus does), else the Prometheus text format.
pub fn response(m: &Metrics, headers: &axum::http::HeaderMap) -> Result<Response, ApiError> {
    let text = m.render()?;
    let wants_openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    if wants_openmetrics {
        return Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response());
    }
    let text = openmetrics_to_prometheus_text(&text);
    Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], text).into_response())
}

/// OpenMetrics text as the Prometheus text format 0.0.4. The two differ
/// where promtool looks: an OpenMetrics counter family is named without
/// `_total` while its samples carry it, so a text parser sees samples with
/// no HELP or TYPE; and `# UNIT`, `# EOF`, `unknown` and `info` do not exist
/// in the older format. Samples are the same in both.
pub fn openmetrics_to_prometheus_text(om: &str) -> String {
    let mut renamed: std::collections::HashMap<&str, (String, &str)> = std::collections::HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, ty)) = rest.split_once(' ') {
                let (suffix, text_type) = match ty {
                    "counter" => ("_total", "counter"),
                    "info" => ("_info", "gauge"),
                    "unknown" => ("", "untyped"),
                    "gaugehistogram" | "stateset" => ("", "untyped"),
                    other => ("", other),
                };
                renamed.insert(name, (format!("{name}{suffix}"), text_type));
            }
        }
    }
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = renamed.get(name).map(|(n, _)| n.as_str()).unwrap_or(name);
            // OpenMetrics also escapes `"` in help; the text format does not.
            out.push_str(&format!("# HELP {name} {}\n", help.replace("\\\"", "\"")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map(|(n, _)| n).unwrap_or(rest);
            if let Some((n, ty)) = renamed.get(name) {
                out.push_str(&format!("# TYPE {n} {ty}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Reads the store and the scheduler at each scrape.
struct StateCollector {
    sched: Scheduler,
    store: crate::store::Store,
    restic: crate::restic::Restic,
    deadline_grace: Option<std::time::Duration>,
    auth: Arc<Auth>,
    soda: Option<crate::kube::SodaStatusBoard>,
    error: Arc<Mutex<Option<StoreError>>>,
}

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LastRunLabels {
    policy: String,
    name: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PausedLabel {
    paused: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecordedLabels {
    kind: String,
    state: String,
}

/// A repository by the hash the agent keys it with (never its URL, which
/// may carry a password).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepoLabel {
    repository: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabel {
    route: &'static str,
}

/// One policy as the gauges show it.
struct PolicyRow {
    labels: PolicyLabels,
    paused: bool,
    /// 0 while paused.
    next_run: i64,
    /// 0 when it never succeeded (or its last success left the run history).
    last_success: i64,
    deadline: Option<i64>,
    period: Option<i64>,
    failures: u32,
    last_run: Option<(&'static str, bool)>,
}

struct Scrape {
    policies: Vec<PolicyRow>,
    recorded: Vec<(String, String, u64)>,
    repositories: Vec<crate::store::RepoMaintenance>,
}

fn read(
    store: &crate::store::Store,
    schedules: &crate::schedules::ScheduleBook,
    grace: Option<std::time::Duration>,
    now: DateTime<Utc>,
) -> Result<Scrape, StoreError> {
    let last = store.last_runs()?;
    let mut policies = Vec::new();
    for p in store.list_policies()? {
        let paused = !p.schedulable();
        let success = store.last_clean_backup(&p.id)?.and_then(|r| r.finished_at);
        let schedules = schedules.of(&p.id, &p.spec).ok();
        let schedule = schedules.as_ref().map(|s| &s.backup);
        let deadline =
            schedule.and_then(|s| backup_deadline(s, p.spec.jitter_seconds, success.unwrap_or(p.created_at), grace));
        policies.push(PolicyRow {
            labels: PolicyLabels::of(&p),
            paused,
            next_run: if paused { 0 } else { p.next_run_at.map(|t| t.timestamp()).unwrap_or(0) },
            last_success: success.map(|t| t.timestamp()).unwrap_or(0),
            deadline: deadline.map(|t| t.timestamp()),
            period: schedule.and_then(|s| schedule_period(s, now)).map(|d| d.num_seconds()),
            failures: p.consecutive_failures,
            last_run: last
                .get(&p.id)
                .filter(|r| r.state.is_terminal())
                .map(|r| (r.state.as_str(), r.state.is_clean_success())),
        });
    }
    Ok(Scrape { policies, recorded: store.run_counts()?, repositories: store.repositories()? })
}

fn gauges<L>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, i64)>,
) -> fmt::Result
where
    L: EncodeLabelSet + Clone + Hash + Eq + fmt::Debug + Send + Sync + 'static,
{
    let fam = Family::<L, Gauge>::default();
    for (labels, v) in rows {
        fam.get_or_create(&labels).set(v);
    }
    fam.encode(enc.encode_descriptor(name, help, unit, MetricType::Gauge)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let now = Utc::now();
        let scrape = match read(&self.store, self.sched.schedules(), self.deadline_grace, now) {
            Ok(s) => s,
            Err(e) => {
                *self.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                return Err(fmt::Error);
            }
        };
        let ps = &scrape.policies;
        let per_policy = |f: fn(&PolicyRow) -> i64| ps.iter().map(move |p| (p.labels.clone(), f(p)));
        let secs = Some(&Unit::Seconds);
        gauge(&mut enc, "soda_syncer_policies", "Policies known to this agent.", ps.len() as i64)?;
        gauges(
            &mut enc,
            "soda_syncer_policy_paused",
            "1 when the policy is paused, by a user or by the agent (its volume is gone); its other gauges stay.",
            None,
            per_policy(|p| i64::from(p.paused)),
        )?;
        gauges(
            &mut enc,
            "soda_syncer_policy_next_run_timestamp",
            "When the policy runs next, in Unix seconds (0 while paused).",
            secs,
            per_policy(|p| p.next_run),
        )?;
        gauges(
            &mut enc,
            "soda_syncer_policy_last_success_timestamp",
            "When the policy's last backup that ended succeeded finished, in Unix seconds (0: none recorded).",
            secs,
            per_policy(|p| p.last_success),
        )?;
        gauges(
            &mut enc,
            "soda_syncer_policy_backup_deadline_timestamp",
            "When the policy's next successful backup is due, in Unix seconds: the first slot after its last success (or its creation) plus jitter plus grace (--deadline-grace-seconds, default one period).",
            secs,
            ps.iter().filter_map(|p| Some((p.labels.clone(), p.deadline?))),
        )?;
        gauges(
            &mut enc,
            "soda_syncer_policy_interval",
            "The policy's schedule period (for cron, the gap after its next slot).",
            secs,
            ps.iter().filter_map(|p| Some((p.labels.clone(), p.period?))),
        )?;
        gauges(
            &mut enc,
            "soda_syncer_policy_consecutive_failures",
            "Scheduled backups of the policy that failed in a row.",
            None,
            per_policy(|p| i64::from(p.failures)),
        )?;
        gauges(
            &mut enc,
            "soda_syncer_policy_last_run_ok",
            "1 when the policy's newest run ended succeeded, 0 otherwise (the state label says how it ended).",
            None,
            ps.iter().filter_map(|p| {
                let (state, ok) = p.last_run?;
                Some((
                    LastRunLabels { policy: p.labels.policy.clone(), name: p.labels.name.clone(), state },
                    i64::from(ok),
                ))
            }),
        )?;
        let overdue = |paused: bool| {
            ps.iter().filter(|p| p.paused == paused && p.deadline.is_some_and(|d| d < now.timestamp())).count() as i64
        };
        gauges(
            &mut enc,
            "soda_syncer_policies_overdue",
            "Policies whose backup deadline has passed, split by whether they are paused.",
            None,
            [(PausedLabel { paused: "false" }, overdue(false)), (PausedLabel { paused: "true" }, overdue(true))],
        )?;
        gauges(
            &mut enc,
            "soda_syncer_runs_recorded",
            "Runs in the agent's run history (trimmed to --keep-runs per policy), by kind and state.",
            None,
            scrape
                .recorded
                .iter()
                .map(|(kind, state, n)| (RecordedLabels { kind: kind.clone(), state: state.clone() }, *n as i64)),
        )?;
        let repo_times = |f: fn(&crate::store::RepoMaintenance) -> Option<DateTime<Utc>>| {
            scrape
                .repositories
                .iter()
                .map(move |m| (RepoLabel { repository: m.key.clone() }, f(m).map(|t| t.timestamp()).unwrap_or(0)))
        };
        gauges(
            &mut enc,
            "soda_syncer_repository_last_prune_timestamp",
            "When this agent last pruned the repository successfully, in Unix seconds (0: never; another node's agent may be its maintainer).",
            secs,
            repo_times(|m| m.last_prune_at),
        )?;
        gauges(
            &mut enc,
            "soda_syncer_repository_last_check_timestamp",
            "When this agent last checked the repository successfully, in Unix seconds (0: never).",
            secs,
            repo_times(|m| m.last_check_at),
        )?;
        gauge(&mut enc, "soda_syncer_queue_depth", "Runs waiting for a free slot.", self.sched.queue_depth() as i64)?;
        gauge(&mut enc, "soda_syncer_running_runs", "Runs executing now.", self.sched.running_count() as i64)?;
        ConstCounter::new(self.restic.lock_recoveries()).encode(enc.encode_descriptor(
            "soda_syncer_stale_lock_recoveries",
            "Repository locks met and cleared of stale entries since start.",
            None,
            MetricType::Counter,
        )?)?;
        if let Some(st) = self.soda.as_ref().map(|b| b.snapshot()) {
            encode_soda(&mut enc, &st)?;
        }
        let refused = Family::<AuthLabel, Counter>::default();
        refused.get_or_create(&AuthLabel { route: "v1" }).inc_by(self.auth.refused_tokens.load(Relaxed));
        refused.get_or_create(&AuthLabel { route: "legacy" }).inc_by(self.auth.refused_legacy.load(Relaxed));
        refused.encode(enc.encode_descriptor(
            "soda_syncer_auth_refused",
            "Requests refused: a missing or wrong token on /v1, or a legacy caller from outside the allowed networks.",
            None,
            MetricType::Counter,
        )?)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The SODA sync's gauges (only while it is on). Pending changes and lag
/// are the leader's: 0 on the other agents.
fn encode_soda(enc: &mut DescriptorEncoder, st: &crate::kube::SodaSyncStatus) -> fmt::Result {
    use crate::kube::SyncState;
    let secs = Some(&Unit::Seconds);
    let ts = |t: Option<DateTime<Utc>>| t.map(|t| t.timestamp()).unwrap_or(0);
    gauge(
        enc,
        "soda_syncer_soda_sync_leader",
        "1 on the one agent that pushes Kubernetes to SODA (the holder of the Lease soda-syncer-soda-sync).",
        i64::from(st.state != SyncState::Following),
    )?;
    gauge(
        enc,
        "soda_syncer_soda_sync_failing",
        "1 while the leader's last sync pass failed (SODA or the Kubernetes API server away, or SODA refusing us).",
        i64::from(st.state == SyncState::Failing),
    )?;
    gauge(
        enc,
        "soda_syncer_soda_sync_pending_changes",
        "Changes not yet in SODA: steps the last pass could not do plus claim and PV changes seen since the last pass that worked began.",
        st.pending_changes.unwrap_or(0) as i64,
    )?;
    ConstGauge::new(st.lag_seconds.unwrap_or(0) as i64).encode(enc.encode_descriptor(
        "soda_syncer_soda_sync_lag",
        "The age of the oldest change not yet in SODA (0: SODA is current).",
        secs,
        MetricType::Gauge,
    )?)?;
    gauges(
        enc,
        "soda_syncer_soda_sync_last_success_timestamp",
        "When the leader's last sync pass that worked ended, in Unix seconds (0: none on this agent).",
        secs,
        [
            (KindLabel { kind: "volumes" }, ts(st.last_success_at)),
            (KindLabel { kind: "profiles" }, ts(st.profiles.last_success_at)),
        ],
    )?;
    let errors = Family::<KindLabel, Counter>::default();
    for (kind, n) in &st.errors {
        errors.get_or_create(&KindLabel { kind }).inc_by(*n);
    }
    errors.encode(enc.encode_descriptor(
        "soda_syncer_soda_sync_errors",
        "SODA sync errors since start (failed passes, refused steps, failed profile polls), by kind.",
        None,
        MetricType::Counter,
    )?)
}

#[cfg(test)]
mod tests {
    use super::openmetrics_to_prometheus_text;

    #[test]
    fn openmetrics_counters_become_text_format_families_named_with_total() {
        let om = "# HELP soda_syncer_runs Runs that \\\"ended\\\".\n# TYPE soda_syncer_runs counter\n\
                  soda_syncer_runs_total{kind=\"backup\"} 1\n# HELP up_seconds Up.\n# TYPE up_seconds gauge\n\
                  # UNIT up_seconds seconds\nup_seconds 3\n# TYPE build info\nbuild_info{v=\"1\"} 1\n# EOF\n";
        let text = openmetrics_to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP soda_syncer_runs_total Runs that \"ended\".\n# TYPE soda_syncer_runs_total counter\n\
             soda_syncer_runs_total{kind=\"backup\"} 1\n# HELP up_seconds Up.\n# TYPE up_seconds gauge\n\
             up_seconds 3\n# TYPE build_info gauge\nbuild_info{v=\"1\"} 1\n"
        );
    }
}

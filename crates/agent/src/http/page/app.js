// soda-syncer's web page: plain script, no framework, no build step.
// Logged in, the browser holds an HttpOnly session cookie; this script holds
// the session's CSRF token in memory only and sends it as X-CSRF-Token on
// every request that may change something. Text from the agent is set with
// textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let csrf = null;
let policies = [];
let shownRun = null; // the run in the details panel
let runEvents = null; // its EventSource while it runs
let restorePolicy = null;
let refreshTimer = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

class ApiFailure extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `the agent answered ${status}`);
    this.status = status;
    this.code = err.code || "";
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (r.status === 401 && path !== "/ui/login") {
    showLogin("Your session ended (logged out, token rotated, or the agent restarted): log in again.");
    throw new ApiFailure(r.status, json);
  }
  if (!r.ok) throw new ApiFailure(r.status, json);
  return json;
}

function notice(msg) { $("notice").textContent = msg; }

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${u[i]}`;
}

// --- login -----------------------------------------------------------------

function showLogin(why) {
  csrf = null;
  stopFollowing();
  clearInterval(refreshTimer);
  $("loading").hidden = true;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("refresh").hidden = true;
  $("node").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = why || "";
  $("token").focus();
}

function showApp(session) {
  csrf = session.csrfToken;
  $("loading").hidden = true;
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("refresh").hidden = false;
  $("node").textContent = `node ${session.node}`;
  loadPolicies();
  clearInterval(refreshTimer);
  refreshTimer = setInterval(loadPolicies, 10000);
}

async function login(ev) {
  ev.preventDefault();
  const token = $("token").value.trim();
  $("login-error").textContent = "";
  if (!token) {
    $("login-error").textContent = "Enter the API token.";
    $("token").focus();
    return;
  }
  $("login-submit").disabled = true;
  try {
    const s = await api("POST", "/ui/login", { token });
    $("token").value = "";
    showApp(s);
  } catch (e) {
    $("login-error").textContent = e.code === "wrong_token"
      ? "Wrong token: that is not one of this agent's API tokens. Copy a line of its token file (by default <state-dir>/token)."
      : `Login failed: ${e.message}`;
    $("token").select();
  } finally {
    $("login-submit").disabled = false;
  }
}

async function logout() {
  try { await api("POST", "/ui/logout"); } catch (_) { /* the session is gone either way */ }
  showLogin("Logged out.");
}

// --- policies and their runs -----------------------------------------------

async function loadPolicies() {
  if (!csrf) return;
  try {
    const all = [];
    let after = "";
    for (;;) {
      const page = await api("GET", `/v1/policies?limit=1000${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      all.push(...page.policies);
      if (!page.next) break;
      after = page.next;
    }
    policies = all;
    const runs = await Promise.all(policies.map((p) =>
      api("GET", `/v1/runs?policy=${encodeURIComponent(p.id)}&limit=30`).then((r) => r.runs, () => [])));
    renderPolicies(runs);
    loadCluster();
  } catch (e) {
    if (e.status !== 401) notice(`Could not load the policies: ${e.message}`);
  }
}

function repositoryText(r) {
  if (r.url) return r.url;
  if (r.secretRef) return `from Secret ${r.secretRef.namespace ? `${r.secretRef.namespace}/` : ""}${r.secretRef.name}`;
  if (r.sodaProfile) return `from SODA profile ${r.sodaProfile}`;
  return "not set";
}

function policyState(p) {
  if (p.status && p.status.state === "volumeGone") return ["paused", "volume gone"];
  if (p.paused) return ["paused", p.pausedByUser ? "paused" : "paused (by the agent)"];
  return ["active", "active"];
}

function renderPolicies(runsPerPolicy) {
  const list = $("policies");
  // Keep keyboard focus on the same control across a refresh.
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.focusKey : null;
  list.replaceChildren();
  $("no-policies").hidden = policies.length > 0;
  policies.forEach((p, i) => {
    const runs = runsPerPolicy[i] || [];
    const [cls, label] = policyState(p);
    const last = p.lastRun;
    const timeline = el("ol", { class: "timeline", "aria-label": `Runs of ${p.name}, oldest first` });
    runs.slice().reverse().forEach((r) => {
      const text = `${r.kind} ${r.state}${r.unchanged ? " (unchanged)" : ""}, ${when(r.queuedAt)}`;
      // The kind's first letter in the square: colour is not the only cue.
      timeline.append(el("li", {}, el("button", {
        type: "button", class: `s-${r.state}`, title: text, "aria-label": text,
        "data-run": r.id, "data-state": r.state, "data-focus-key": `run-${r.id}`,
        onclick: () => showRun(r.id),
      }, el("span", { "aria-hidden": "true", text: r.kind.slice(0, 1).toUpperCase() }))));
    });
    const item = el("li", { class: "policy", "data-policy": p.name, "aria-labelledby": `p-${p.id}` },
      el("h3", { id: `p-${p.id}` }, `${p.name} `, el("span", { class: `badge s-${cls}`, text: label })),
      el("p", { class: "meta", text: `source ${p.source.path || p.volume || JSON.stringify(p.source)}` }),
      el("p", { class: "meta", text: `repository ${repositoryText(p.repository)}` }),
      p.volume ? el("p", { class: "meta", text: `volume ${p.volume}` }) : null,
      el("p", { class: "meta" }, "last run: ",
        last ? el("span", { class: `badge s-${last.state}`, "data-last-state": last.state, text: `${last.kind} ${last.state}` }) : "none",
        last && last.finishedAt ? ` ${when(last.finishedAt)}` : "",
        p.nextRunAt ? ` · next ${when(p.nextRunAt)}` : "",
        p.consecutiveFailures ? ` · ${p.consecutiveFailures} failure${p.consecutiveFailures === 1 ? "" : "s"} in a row` : ""),
      p.status && p.status.message ? el("p", { class: "meta", text: p.status.message }) : null,
      runs.length ? timeline : el("p", { class: "meta", text: "no runs yet" }),
      el("div", { class: "actions" },
        el("button", { type: "button", class: "primary", "data-action": "backup", "data-focus-key": `backup-${p.id}`,
          "aria-label": `Back up ${p.name} now`, text: "Back up now", onclick: (e) => startBackup(p, e.target) }),
        el("button", { type: "button", "data-action": "restore", "data-focus-key": `restore-${p.id}`,
          "aria-label": `Restore ${p.name}…`, text: "Restore…", onclick: () => openRestore(p) })));
    list.append(item);
  });
  if (focused) {
    const again = list.querySelector(`[data-focus-key="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

async function startBackup(p, button) {
  button.disabled = true;
  try {
    const run = await api("POST", `/v1/policies/${encodeURIComponent(p.id)}/run`);
    notice(`Backup of ${p.name} queued.`);
    showRun(run.id, run);
  } catch (e) {
    if (e.status !== 401) notice(`Could not start a backup of ${p.name}: ${e.message}`);
  } finally {
    button.disabled = false;
  }
  loadPolicies();
}

// --- the cluster (GET /v1/cluster, with Kubernetes on) ---------------------

let clusterOff = false;

async function loadCluster() {
  if (clusterOff) return;
  let r;
  try {
    r = await api("GET", "/v1/cluster");
  } catch (e) {
    if (e.code === "kubernetes_off") { clusterOff = true; $("cluster").hidden = true; return; }
    if (e.status !== 401) { $("cluster").hidden = false; $("cluster-error").textContent = `Could not read the cluster: ${e.message}`; }
    return;
  }
  $("cluster").hidden = false;
  $("cluster-error").textContent = "";
  const s = r.summary;
  $("cluster-summary").textContent =
    `${s.protected} of ${s.claims} claims protected, ${s.overdue} overdue, ${s.failing} failing, ${s.unprotected} unprotected`;
  const body = $("cluster-claims").tBodies[0];
  body.replaceChildren();
  for (const c of r.claims) {
    const why = c.protected ? "yes" : `no: ${(c.whyNot || "").replace(/[A-Z]/g, (m) => ` ${m.toLowerCase()}`)}`;
    body.append(el("tr", { class: c.overdue ? "overdue" : null, "data-claim": `${c.namespace}/${c.name}`,
      "data-protected": String(c.protected) },
      el("th", { scope: "row", text: `${c.namespace}/${c.name}` }),
      el("td", { text: why + (c.detail ? ` (${c.detail})` : "") }),
      el("td", { text: c.node || "—" }),
      el("td", {}, c.lastState ? el("span", { class: `badge s-${c.lastState}`, text: c.lastState }) : "—"),
      el("td", { text: when(c.lastSuccess) }),
      el("td", { text: c.overdue ? `overdue since ${when(c.deadline)}` : when(c.deadline) })));
  }
  $("cluster-agents").replaceChildren(...r.agents.map((a) =>
    el("li", { text: `${a.node}: ${a.alive ? "alive" : "gone"}${a.renewedAt ? `, renewed ${when(a.renewedAt)}` : ""}` })));
}

// --- one run ---------------------------------------------------------------

function stopFollowing() {
  if (runEvents) { runEvents.close(); runEvents = null; }
}

async function showRun(id, known) {
  stopFollowing();
  shownRun = id;
  $("run").hidden = false;
  let run = known;
  if (!run) {
    try { run = await api("GET", `/v1/runs/${encodeURIComponent(id)}`); } catch (e) {
      if (e.status !== 401) notice(`Could not load run ${id}: ${e.message}`);
      return;
    }
  }
  renderRun(run);
  $("run-title").focus();
  if (run.state === "queued" || run.state === "running") follow(id);
}

function follow(id) {
  // The agent's event stream: progress about twice a second, then `end`.
  const es = new EventSource(`/v1/runs/${encodeURIComponent(id)}/events`);
  runEvents = es;
  es.addEventListener("progress", (m) => { if (shownRun === id) renderRun(JSON.parse(m.data), "events"); });
  es.addEventListener("end", (m) => {
    es.close();
    if (runEvents === es) runEvents = null;
    if (shownRun === id) renderRun(JSON.parse(m.data), "events");
    loadPolicies();
  });
  es.onerror = () => {
    // Closed by the agent after `end`, or the session ended: look once more.
    es.close();
    if (runEvents === es) runEvents = null;
    if (shownRun === id) api("GET", `/v1/runs/${encodeURIComponent(id)}`).then(renderRun, () => {});
  };
}

function renderRun(run, via) {
  const policy = policies.find((p) => p.id === run.policyId);
  const box = $("run");
  box.dataset.runId = run.id;
  box.dataset.state = run.state;
  box.dataset.via = via || "fetch";
  $("run-title").textContent = `Run ${run.id}`;
  const rows = [
    ["Policy", policy ? policy.name : run.policyId],
    ["Kind", run.kind],
    ["State", el("span", { id: "run-state", class: `badge s-${run.state}`, text: run.state })],
    ["Trigger", run.trigger],
    ["Queued", when(run.queuedAt)],
    ["Started", when(run.startedAt)],
    ["Finished", when(run.finishedAt)],
    ["Snapshot", run.snapshotId || "—"],
  ];
  const u = run.unchanged;
  if (u) {
    // A scheduled run that proved the volume unchanged: no restic ran.
    const how = u.proof === "btrfs-generation" ? "the btrfs subvolume's generation" : `a walk of ${u.entries} entries`;
    rows.push(["Unchanged", el("span", { id: "run-unchanged",
      text: `unchanged since snapshot ${String(u.snapshotId).slice(0, 8)} (backed up ${when(u.backedUpAt)}), verified ${when(u.verifiedAt)} by ${how}` })]);
  }
  const s = run.summary;
  if (s) {
    rows.push(["Files", `${s.filesNew} new, ${s.filesChanged} changed, ${s.filesUnmodified} unmodified (${s.totalFilesProcessed} in all)`]);
    rows.push(["Data", `${bytes(s.totalBytesProcessed)} read, ${bytes(s.dataAdded)} added, in ${Number(s.totalDuration).toFixed(1)} s`]);
    if (s.unreadable && s.unreadable.length) rows.push(["Unreadable", s.unreadable.join(", ")]);
  }
  if (run.consistency && run.consistency.method) rows.push(["Consistency", run.consistency.method]);
  if (run.warning) rows.push(["Warning", run.warning]);
  const dl = $("run-details");
  dl.replaceChildren();
  for (const [k, v] of rows) dl.append(el("dt", { text: k }), el("dd", {}, v));
  const live = run.state === "queued" || run.state === "running";
  const p = run.progress;
  // Once a run has ended its summary says more than its last progress.
  $("run-progress-box").hidden = !live;
  if (p) {
    $("run-progress").value = Math.round((p.percentDone || 0) * 100);
    $("run-progress-text").textContent =
      `${Math.round((p.percentDone || 0) * 100)} % · ${p.filesDone}/${p.totalFiles} files · ${bytes(p.bytesDone)} of ${bytes(p.totalBytes)}`
      + (p.secondsRemaining ? ` · ${p.secondsRemaining} s left` : "");
  } else {
    $("run-progress").removeAttribute("value");
    $("run-progress-text").textContent = run.state === "queued" ? "queued" : "starting";
  }
  $("run-error").textContent = run.error ? `${run.error.code}: ${run.error.message}` : "";
  const cancel = $("run-cancel");
  cancel.hidden = !live;
  cancel.onclick = async () => {
    try { await api("POST", `/v1/runs/${encodeURIComponent(run.id)}/cancel`); notice("Cancelling."); } catch (e) {
      if (e.status !== 401) notice(`Could not cancel: ${e.message}`);
    }
  };
}

// --- restore ---------------------------------------------------------------

async function openRestore(p) {
  restorePolicy = p;
  $("restore").hidden = false;
  $("restore-policy").textContent = p.name;
  $("restore-form").reset();
  $("restore-confirm-box").hidden = true;
  $("restore-error").textContent = "";
  updateRestoreButton();
  $("restore-title").focus();
  const sel = $("restore-snapshot");
  sel.replaceChildren(el("option", { value: "latest", text: "latest" }));
  try {
    const list = await api("GET", `/v1/policies/${encodeURIComponent(p.id)}/snapshots`);
    for (const s of list.snapshots) {
      sel.append(el("option", { value: s.id, text: `${s.shortId || s.id.slice(0, 8)} · ${when(s.time)}` }));
    }
  } catch (e) {
    if (e.status !== 401) $("restore-error").textContent = `Could not list the snapshots: ${e.message}`;
  }
}

function updateRestoreButton() {
  const inPlace = $("restore-inplace").checked;
  $("restore-confirm-box").hidden = !inPlace;
  $("restore-target").disabled = inPlace;
  const confirmed = !inPlace || (restorePolicy && $("restore-confirm").value === restorePolicy.name);
  $("restore-submit").disabled = !confirmed;
  $("restore-submit").textContent = inPlace ? "Restore in place" : "Restore into the new directory";
}

async function submitRestore(ev) {
  ev.preventDefault();
  const p = restorePolicy;
  const inPlace = $("restore-inplace").checked;
  if (inPlace && $("restore-confirm").value !== p.name) {
    $("restore-error").textContent = `Type ${p.name} to confirm a restore in place.`;
    return;
  }
  const body = { snapshot: $("restore-snapshot").value, verify: $("restore-verify").checked };
  const include = $("restore-include").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (include.length) body.include = include;
  if (inPlace) body.inPlace = true;
  else if ($("restore-target").value.trim()) body.target = $("restore-target").value.trim();
  $("restore-submit").disabled = true;
  $("restore-error").textContent = "";
  try {
    const run = await api("POST", `/v1/policies/${encodeURIComponent(p.id)}/restore`, body);
    notice(`Restore of ${p.name} queued.`);
    $("restore").hidden = true;
    showRun(run.id, run);
    loadPolicies();
  } catch (e) {
    if (e.status !== 401) $("restore-error").textContent = `Restore refused: ${e.message}`;
  } finally {
    updateRestoreButton();
  }
}

// --- start -----------------------------------------------------------------

document.addEventListener("DOMContentLoaded", async () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("refresh").addEventListener("click", loadPolicies);
  $("restore-form").addEventListener("submit", submitRestore);
  $("restore-inplace").addEventListener("change", updateRestoreButton);
  $("restore-confirm").addEventListener("input", updateRestoreButton);
  $("restore-close").addEventListener("click", () => { $("restore").hidden = true; });
  try {
    const r = await fetch("/ui/session", { credentials: "same-origin", cache: "no-store" });
    if (r.ok) showApp(await r.json()); else showLogin("");
  } catch (e) {
    showLogin(`The agent cannot be reached: ${e.message}`);
  }
});

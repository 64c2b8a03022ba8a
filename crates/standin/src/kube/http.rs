//! Request handling: discovery, the verbs, and watch streams.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::store::{self, ApiError, Obj, Part, Selector, Store, RESOURCES};
use super::{patch, RecordedRequest, Shared};

type Answer = Result<Response<Body>, ApiError>;

fn reply(code: u16, body: impl Into<Body>) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .expect("response")
}

fn json_reply(code: u16, v: &Value) -> Response<Body> {
    reply(code, serde_json::to_vec(v).expect("json"))
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Some((ns, pod)) = super::exec::exec_target(req.uri().path()) {
        return Ok(exec(&shared, &ns, &pod, req));
    }
    let (parts, body) = req.into_parts();
    let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut record = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        content_type,
        status: 0,
    };
    let answer = async {
        if let Some(code) = shared.take_fault() {
            let reason = match code {
                429 => "TooManyRequests",
                500 => "InternalError",
                503 => "ServiceUnavailable",
                504 => "Timeout",
                _ => "Unknown",
            };
            return Err(ApiError::new(code, reason, "injected fault"));
        }
        let token = shared.token.lock().unwrap().clone();
        if let Some(token) = token {
            let sent = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if sent != Some(&format!("Bearer {token}")) {
                return Err(ApiError::new(401, "Unauthorized", "Unauthorized"));
            }
        }
        let body = axum::body::to_bytes(Body::new(body), 64 << 20)
            .await
            .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        route(&shared, &parts.method, &parts.headers, &record, body)
    }
    .await;
    let resp = answer.unwrap_or_else(|e| json_reply(e.code, &e.to_status()));
    record.status = resp.status().as_u16();
    shared.requests.lock().unwrap().push(record);
    Ok(resp)
}

/// `pods/exec`: the token check and the record, then the upgrade.
fn exec(shared: &Arc<Shared>, ns: &str, pod: &str, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let mut record = RecordedRequest {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or_default().to_string(),
        content_type: None,
        status: 0,
    };
    let token = shared.token.lock().unwrap().clone();
    let sent = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let answer = match token {
        Some(t) if sent != Some(&format!("Bearer {t}")) => Err(ApiError::new(401, "Unauthorized", "Unauthorized")),
        _ => super::exec::handle(shared, ns, pod, req),
    };
    let resp = answer.unwrap_or_else(|e| json_reply(e.code, &e.to_status()));
    record.status = resp.status().as_u16();
    shared.requests.lock().unwrap().push(record);
    resp
}

/// The parsed query string (kube-rs sends `?&a=b`: empty pairs are skipped).
struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

fn route(shared: &Arc<Shared>, method: &Method, headers: &HeaderMap, req: &RecordedRequest, body: Bytes) -> Answer {
    let q = Query(form_urlencoded::parse(req.query.as_bytes()).into_owned().collect());
    let segs: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let discovery = |v: Value| -> Answer {
        if method != Method::GET {
            return Err(ApiError::new(405, "MethodNotAllowed", "the server does not allow this method"));
        }
        Ok(json_reply(200, &v))
    };
    match segs.as_slice() {
        ["version"] => discovery(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-standin", "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
        })),
        ["api"] => discovery(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr() }],
        })),
        ["apis"] => discovery(json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups(None) })),
        ["apis", g] if !groups(Some(g)).is_empty() => {
            let mut group = groups(Some(g)).remove(0);
            group["kind"] = json!("APIGroup");
            group["apiVersion"] = json!("v1");
            discovery(group)
        }
        ["api", "v1"] => discovery(resource_list("", "v1")),
        ["apis", g, v] if RESOURCES.iter().any(|r| r.group == *g && r.version == *v) => discovery(resource_list(g, v)),
        // An empty protobuf `openapi_v2.Document`: a server without models.
        // kubectl then skips client-side validation for every kind.
        ["openapi", "v2"] if method == Method::GET => Ok(Response::builder()
            .header(header::CONTENT_TYPE, "application/com.github.proto-openapi.spec.v2.v1.0+protobuf")
            .body(Body::empty())
            .expect("response")),
        ["api", "v1", rest @ ..] if !rest.is_empty() => resource(shared, method, headers, &q, "", "v1", rest, body),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => resource(shared, method, headers, &q, g, v, rest, body),
        _ => Err(ApiError::new(404, "NotFound", "the server could not find the requested resource")),
    }
}

fn groups(only: Option<&str>) -> Vec<Value> {
    let mut names: Vec<&str> = RESOURCES.iter().map(|r| r.group).filter(|g| !g.is_empty()).collect();
    names.dedup();
    names
        .into_iter()
        .filter(|g| only.is_none_or(|o| o == *g))
        .map(|g| {
            let gv = json!({ "groupVersion": format!("{g}/v1"), "version": "v1" });
            json!({ "name": g, "versions": [gv.clone()], "preferredVersion": gv })
        })
        .collect()
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut out = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.group == group && r.version == version) {
        out.push(json!({
            "name": r.plural, "singularName": r.singular(), "namespaced": r.namespaced, "kind": r.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"], "shortNames": r.short_names(),
        }));
        if r.status {
            out.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out })
}

#[allow(clippy::too_many_arguments)]
fn resource(
    shared: &Arc<Shared>,
    method: &Method,
    headers: &HeaderMap,
    q: &Query,
    group: &str,
    version: &str,
    segs: &[&str],
    body: Bytes,
) -> Answer {
    let not_found = || ApiError::new(404, "NotFound", "the server could not find the requested resource");
    let namespaced = (segs.len() >= 3 && segs[0] == "namespaces")
        .then(|| store::find(group, version, segs[2]))
        .flatten()
        .filter(|i| RESOURCES[*i].namespaced);
    let (res, ns, rest) = match namespaced {
        Some(i) => (i, Some(segs[1]), &segs[3..]),
        None => (store::find(group, version, segs[0]).ok_or_else(not_found)?, None, &segs[1..]),
    };
    let r = &RESOURCES[res];
    let (name, status) = match rest {
        [] => (None, false),
        [name] => (Some(*name), false),
        [name, "status"] if r.status => (Some(*name), true),
        _ => return Err(not_found()),
    };
    if name.is_some() && r.namespaced != ns.is_some() {
        return Err(not_found());
    }
    let ns_key = ns.unwrap_or("");
    let dry_run = q.get("dryRun").is_some_and(|d| !d.is_empty());
    let part = if status { Part::Status } else { Part::Main };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let parse = |body: &[u8]| -> Result<Value, ApiError> {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("the body of the request was in an unknown format: {e}")))
    };
    let json_body = || -> Result<Value, ApiError> {
        if media != "application/json" {
            return Err(ApiError::new(415, "UnsupportedMediaType", format!("the body of the request was in an unknown format - accepted media types include: application/json (got {media})")));
        }
        parse(&body)
    };
    let wants_table = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=Table"));
    let one = |code: u16, o: &Obj| {
        if wants_table {
            json_reply(code, &table(o.rv, std::slice::from_ref(&o.json)))
        } else {
            reply(code, o.json.clone())
        }
    };
    match (method.clone(), name) {
        (Method::GET, None) => {
            let sel = Selector::parse(r, q.get("labelSelector").unwrap_or(""), q.get("fieldSelector").unwrap_or(""))?;
            if q.flag("watch") {
                return watch(shared, res, ns, sel, q);
            }
            list(&shared.store.lock().unwrap(), res, ns, &sel, q, wants_table)
        }
        (Method::GET, Some(name)) => {
            let o =
                shared.store.lock().unwrap().get(res, ns_key, name).ok_or_else(|| ApiError::not_found(res, name))?;
            Ok(one(200, &o))
        }
        (Method::POST, None) => {
            let v = json_body()?;
            let o = shared.write(|s| s.create(res, ns_key, v, dry_run))?;
            Ok(one(201, &o))
        }
        (Method::PUT, Some(name)) => {
            let v = json_body()?;
            let o = shared.write(|s| s.update(res, ns_key, name, v, part, dry_run))?;
            Ok(one(200, &o))
        }
        (Method::PATCH, Some(name)) => {
            let p = parse(&body)?;
            let kind = match media {
                "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
                | "application/json-patch+json"
                | "application/apply-patch+yaml" => media,
                _ => {
                    let msg = format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {media})");
                    return Err(ApiError::new(415, "UnsupportedMediaType", msg));
                }
            };
            let (o, created) = shared.write(|s| {
                let Some(cur) = s.get(res, ns_key, name) else {
                    if kind == "application/apply-patch+yaml" && !status {
                        let mut p = p;
                        p["metadata"]["name"] = json!(name);
                        return s.create(res, ns_key, p, dry_run).map(|o| (o, true));
                    }
                    return Err(ApiError::not_found(res, name));
                };
                let mut v = cur.value();
                match kind {
                    "application/merge-patch+json" => json_patch::merge(&mut v, &p),
                    "application/json-patch+json" => {
                        let ops: json_patch::Patch = serde_json::from_value(p)
                            .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
                        json_patch::patch(&mut v, &ops).map_err(|e| {
                            ApiError::new(
                                422,
                                "Invalid",
                                format!("the server rejected our request due to an error in our request: {e}"),
                            )
                        })?;
                    }
                    _ => patch::strategic(&mut v, &p).map_err(ApiError::bad_request)?,
                }
                s.update(res, ns_key, name, v, part, dry_run).map(|o| (o, false))
            })?;
            Ok(one(if created { 201 } else { 200 }, &o))
        }
        (Method::DELETE, Some(name)) => {
            let opts = if body.is_empty() { Value::Null } else { parse(&body)? };
            let pre = &opts["preconditions"];
            let pre = (pre["resourceVersion"].as_str(), pre["uid"].as_str());
            let (o, gone) = shared.write(|s| s.delete(res, ns_key, name, pre, dry_run))?;
            Ok(one(if gone { 200 } else { 202 }, &o))
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", format!("{method} is not supported here"))),
    }
}

fn list(s: &Store, res: usize, ns: Option<&str>, sel: &Selector, q: &Query, wants_table: bool) -> Answer {
    let r = &RESOURCES[res];
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    // The token: "<rv of the first page>|<namespace>|<name of the last item>".
    let (rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        None => (s.rv, None),
        Some(token) => {
            let mut it = token.splitn(3, '|');
            let (Some(rv), Some(a), Some(b)) = (it.next().and_then(|rv| rv.parse::<u64>().ok()), it.next(), it.next())
            else {
                return Err(ApiError::bad_request("invalid continue token"));
            };
            if rv < s.compacted {
                let msg = "The provided continue parameter is too old to display a consistent list result. \
                           You can start a new list without the continue parameter.";
                return Err(ApiError::new(410, "Expired", msg));
            }
            (rv, Some((a, b)))
        }
    };
    let (items, remaining) = s.list(res, ns, sel, limit, after);
    let jsons: Vec<Bytes> = items.iter().map(|o| o.json.clone()).collect();
    if wants_table {
        return Ok(json_reply(200, &table(rv, &jsons)));
    }
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if remaining > 0 {
        let last = items.last().expect("a full page");
        meta["continue"] = json!(format!("{rv}|{}|{}", last.ns, last.name));
        meta["remainingItemCount"] = json!(remaining);
    }
    let head = json!({ "kind": format!("{}List", r.kind), "apiVersion": r.api_version(), "metadata": meta });
    let mut out = serde_json::to_vec(&head).expect("json");
    out.pop(); // the closing brace: the items follow
    out.extend_from_slice(b",\"items\":[");
    for (i, j) in jsons.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(j);
    }
    out.extend_from_slice(b"]}");
    Ok(reply(200, out))
}

/// The default table (what the real server answers for a resource without
/// its own printer): Name and Created At, each row with the object's
/// metadata as `PartialObjectMetadata`.
fn table(rv: u64, jsons: &[Bytes]) -> Value {
    let rows: Vec<Value> = jsons
        .iter()
        .map(|j| {
            let v: Value = serde_json::from_slice(j).expect("stored JSON");
            let m = &v["metadata"];
            json!({
                "cells": [m["name"], m["creationTimestamp"]],
                "object": { "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": m },
            })
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": { "resourceVersion": rv.to_string() },
        "columnDefinitions": [
            { "name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0 },
            { "name": "Created At", "type": "date", "format": "", "description": "CreationTimestamp is a timestamp representing the server time when this object was created.", "priority": 0 },
        ],
        "rows": rows,
    })
}

struct Watch {
    shared: Arc<Shared>,
    res: usize,
    ns: Option<String>,
    sel: Selector,
    last: u64,
    epoch: u64,
    first: Option<Vec<u8>>,
    deadline: Instant,
    bookmarks: Option<(Duration, Instant)>,
    rv_rx: tokio::sync::watch::Receiver<u64>,
    sig_rx: tokio::sync::watch::Receiver<super::Signals>,
    done: bool,
}

fn watch(shared: &Arc<Shared>, res: usize, ns: Option<&str>, sel: Selector, q: &Query) -> Answer {
    let r = &RESOURCES[res];
    let rv = q.get("resourceVersion").filter(|v| !v.is_empty());
    let initial = match q.get("sendInitialEvents") {
        Some(v) => v == "true",
        None => rv.is_none_or(|v| v == "0"),
    };
    let last = match rv {
        None => shared.store.lock().unwrap().rv,
        Some(v) => v.parse().map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
    };
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800);
    let every = *shared.bookmark_every.lock().unwrap();
    let mut st = Watch {
        shared: shared.clone(),
        res,
        ns: ns.map(str::to_string),
        sel,
        last,
        epoch: shared.signals.borrow().epoch,
        first: None,
        deadline: Instant::now() + Duration::from_secs(timeout),
        bookmarks: q.flag("allowWatchBookmarks").then(|| (every, Instant::now() + every)),
        rv_rx: shared.rv_tx.subscribe(),
        sig_rx: shared.signals.subscribe(),
        done: false,
    };
    if initial {
        let mut out = Vec::new();
        st.last = shared.store.lock().unwrap().snapshot(res, ns, &st.sel, &mut out);
        if q.get("sendInitialEvents") == Some("true") {
            store::bookmark(&mut out, r, st.last, true);
        }
        st.first = Some(out);
    }
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if let Some(first) = st.first.take().filter(|f| !f.is_empty()) {
            return Some((Ok::<_, Infallible>(Bytes::from(first)), st));
        }
        loop {
            if st.done {
                return None;
            }
            let sig = *st.sig_rx.borrow_and_update();
            if sig.expire > st.epoch {
                st.done = true;
                return Some((Ok(Bytes::from_static(store::EXPIRED_LINE)), st));
            }
            if sig.close > st.epoch {
                return None;
            }
            st.rv_rx.borrow_and_update();
            let mut out = Vec::new();
            let seen =
                st.shared.store.lock().unwrap().events_since(st.res, st.ns.as_deref(), &st.sel, st.last, &mut out);
            match seen {
                Err(store::Expired) => {
                    st.done = true;
                    return Some((Ok(Bytes::from_static(store::EXPIRED_LINE)), st));
                }
                Ok(rv) => st.last = rv,
            }
            if !out.is_empty() {
                return Some((Ok(Bytes::from(out)), st));
            }
            let next_bookmark = st.bookmarks.map(|(_, at)| at).unwrap_or(st.deadline);
            tokio::select! {
                changed = st.rv_rx.changed() => if changed.is_err() { return None },
                changed = st.sig_rx.changed() => if changed.is_err() { return None },
                _ = tokio::time::sleep_until(st.deadline) => return None,
                _ = tokio::time::sleep_until(next_bookmark), if st.bookmarks.is_some() => {
                    let (every, _) = st.bookmarks.expect("bookmarks");
                    st.bookmarks = Some((every, Instant::now() + every));
                    store::bookmark(&mut out, &RESOURCES[st.res], st.last, false);
                    return Some((Ok(Bytes::from(out)), st));
                }
            }
        }
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("response"))
}

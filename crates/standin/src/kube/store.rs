//! The resource table, the object store, selectors and the bounded watch
//! history. Everything here is synchronous and runs under one mutex.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use axum::body::Bytes;
use serde_json::{json, Map, Value};

/// One served resource (all `v1`).
pub(crate) struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource (and the main resource ignores status).
    pub status: bool,
    short: &'static str,
    /// The field-selector labels the real server supports beyond
    /// `metadata.name` and `metadata.namespace`, space-separated.
    fields: &'static str,
}

impl Resource {
    pub fn api_version(&self) -> String {
        match self.group {
            "" => self.version.to_string(),
            g => format!("{g}/{}", self.version),
        }
    }
    pub fn singular(&self) -> String {
        self.kind.to_ascii_lowercase()
    }
    pub fn short_names(&self) -> Vec<&'static str> {
        self.short.split_whitespace().collect()
    }
    fn fields(&self) -> impl Iterator<Item = &'static str> {
        self.fields.split_whitespace()
    }
}

const NS: u8 = 1;
const STATUS: u8 = 2;

const fn res(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    flags: u8,
    short: &'static str,
) -> Resource {
    let (namespaced, status) = (flags & NS != 0, flags & STATUS != 0);
    Resource { group, version: "v1", plural, kind, namespaced, status, short, fields: "" }
}

const fn with_fields(r: Resource, fields: &'static str) -> Resource {
    Resource { fields, ..r }
}

pub(crate) static RESOURCES: &[Resource] = &[
    with_fields(
        res("", "pods", "Pod", NS | STATUS, "po"),
        "spec.nodeName spec.restartPolicy spec.schedulerName spec.serviceAccountName status.phase status.podIP \
         status.nominatedNodeName",
    ),
    res("", "persistentvolumeclaims", "PersistentVolumeClaim", NS | STATUS, "pvc"),
    res("", "persistentvolumes", "PersistentVolume", STATUS, "pv"),
    with_fields(res("", "nodes", "Node", STATUS, "no"), "spec.unschedulable"),
    with_fields(res("", "secrets", "Secret", NS, ""), "type"),
    with_fields(res("", "namespaces", "Namespace", STATUS, "ns"), "status.phase"),
    with_fields(
        res("", "events", "Event", NS, "ev"),
        "involvedObject.kind involvedObject.namespace involvedObject.name involvedObject.uid \
         involvedObject.apiVersion involvedObject.resourceVersion involvedObject.fieldPath reason \
         reportingComponent source type",
    ),
    res("", "configmaps", "ConfigMap", NS, "cm"),
    res("storage.k8s.io", "storageclasses", "StorageClass", 0, "sc"),
    res("storage.k8s.io", "csidrivers", "CSIDriver", 0, ""),
    res("storage.k8s.io", "csinodes", "CSINode", 0, ""),
    with_fields(
        res("events.k8s.io", "events", "Event", NS, "ev"),
        "regarding.kind regarding.namespace regarding.name regarding.uid reason reportingController type",
    ),
    res("coordination.k8s.io", "leases", "Lease", NS, ""),
];

pub(crate) fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    RESOURCES.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// By `apiVersion` and kind, plural, singular or short name.
pub(crate) fn find_by_name(api_version: &str, name: &str) -> Option<usize> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let name = name.to_ascii_lowercase();
    RESOURCES.iter().position(|r| {
        r.group == group
            && r.version == version
            && (r.kind.eq_ignore_ascii_case(&name) || r.plural == name || r.short_names().contains(&&*name))
    })
}

/// A failure in the shape of a Kubernetes `Status`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub(crate) details: Option<(usize, String)>,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into(), details: None }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }
    /// An error about one object, with `details` as the real server fills them.
    pub(crate) fn about(res: usize, name: &str, code: u16, reason: &'static str, what: &str) -> ApiError {
        let r = &RESOURCES[res];
        let kind = if r.group.is_empty() { r.plural.to_string() } else { format!("{}.{}", r.plural, r.group) };
        let message = match reason {
            "Conflict" => format!(
                "Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again"
            ),
            _ => format!("{kind} \"{name}\" {what}"),
        };
        ApiError { code, reason, message, details: Some((res, name.to_string())) }
    }
    pub(crate) fn not_found(res: usize, name: &str) -> ApiError {
        ApiError::about(res, name, 404, "NotFound", "not found")
    }
    pub(crate) fn conflict(res: usize, name: &str) -> ApiError {
        ApiError::about(res, name, 409, "Conflict", "")
    }

    /// The `Status` body.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some((res, name)) = &self.details {
            let r = &RESOURCES[*res];
            s["details"] = json!({ "name": name, "kind": r.plural });
            if !r.group.is_empty() {
                s["details"]["group"] = json!(r.group);
            }
        }
        s
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// One stored object: its serialized JSON (what every answer sends), plus
/// the labels and field values selectors look at, so lists and watches
/// never parse it.
pub(crate) struct Obj {
    pub ns: Box<str>,
    pub name: Box<str>,
    pub rv: u64,
    pub json: Bytes,
    labels: Box<[(Box<str>, Box<str>)]>,
    fields: Box<[Box<str>]>,
}

impl Obj {
    fn new(res: &Resource, v: &Value, rv: u64) -> Obj {
        let m = &v["metadata"];
        let labels = m["labels"].as_object().into_iter().flatten();
        let field = |path: &str| -> Box<str> {
            let mut cur = v;
            for p in path.split('.') {
                cur = &cur[p];
            }
            match cur {
                Value::String(s) => s.as_str().into(),
                Value::Null => "".into(),
                Value::Bool(b) => b.to_string().into(),
                other => other.to_string().into(),
            }
        };
        Obj {
            ns: m["namespace"].as_str().unwrap_or_default().into(),
            name: m["name"].as_str().unwrap_or_default().into(),
            rv,
            json: Bytes::from(serde_json::to_vec(v).expect("serialize").into_boxed_slice()),
            labels: labels.map(|(k, v)| (k.as_str().into(), v.as_str().unwrap_or_default().into())).collect(),
            fields: res.fields().map(field).collect(),
        }
    }

    pub fn value(&self) -> Value {
        serde_json::from_slice(&self.json).expect("stored JSON")
    }

    fn label(&self, k: &str) -> Option<&str> {
        self.labels.iter().find(|(lk, _)| &**lk == k).map(|(_, v)| &**v)
    }

    /// The same object with another `metadata.resourceVersion`.
    fn with_rv(&self, res: &Resource, rv: u64) -> Obj {
        let mut v = self.value();
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        Obj::new(res, &v, rv)
    }
}

enum LabelReq {
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector` plus `fieldSelector`.
pub(crate) struct Selector {
    labels: Vec<LabelReq>,
    /// (field index: usize::MAX = name, MAX-1 = namespace, value, negated)
    fields: Vec<(usize, String, bool)>,
}

/// Split on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

impl Selector {
    pub fn parse(res: &Resource, label: &str, field: &str) -> Result<Selector, ApiError> {
        let bad = |what: &str, s: &str| ApiError::bad_request(format!("unable to parse requirement: {what} {s:?}"));
        let bad_field = |k: &str| ApiError::bad_request(format!("field label not supported: {k}"));
        let mut labels = Vec::new();
        for req in split_top(label) {
            let set = |rest: &str| -> Option<Vec<String>> {
                let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
                Some(inner.split(',').map(|v| v.trim().to_string()).collect())
            };
            let words: Vec<&str> = req.splitn(3, ' ').collect();
            labels.push(if let Some(k) = req.strip_prefix('!') {
                LabelReq::Absent(k.trim().into())
            } else if let Some((k, v)) = req.split_once("!=") {
                LabelReq::NotIn(k.trim().into(), vec![v.trim().into()])
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                LabelReq::In(k.trim().into(), vec![v.trim().into()])
            } else if words.len() >= 2 && matches!(words[1], "in" | "notin") {
                let rest = req[words[0].len()..].trim_start()[words[1].len()..].trim();
                let vals = set(rest).ok_or_else(|| bad("label", req))?;
                match words[1] {
                    "in" => LabelReq::In(words[0].into(), vals),
                    _ => LabelReq::NotIn(words[0].into(), vals),
                }
            } else if req.contains([' ', '(', ')', '<', '>']) {
                return Err(bad("label", req));
            } else {
                LabelReq::Exists(req.into())
            });
        }
        let mut fields = Vec::new();
        for req in split_top(field) {
            let (k, v, neg) = if let Some((k, v)) = req.split_once("!=") {
                (k, v, true)
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                (k, v, false)
            } else {
                return Err(bad("field", req));
            };
            let idx = match k.trim() {
                "metadata.name" => usize::MAX,
                "metadata.namespace" => usize::MAX - 1,
                k => res.fields().position(|f| f == k).ok_or_else(|| bad_field(k))?,
            };
            fields.push((idx, v.trim().to_string(), neg));
        }
        Ok(Selector { labels, fields })
    }

    pub fn matches(&self, o: &Obj) -> bool {
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Exists(k) => o.label(k).is_some(),
            LabelReq::Absent(k) => o.label(k).is_none(),
            LabelReq::In(k, vs) => o.label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => o.label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
        });
        labels_ok
            && self.fields.iter().all(|(idx, v, neg)| {
                let actual = match *idx {
                    usize::MAX => &*o.name,
                    i if i == usize::MAX - 1 => &*o.ns,
                    i => &*o.fields[i],
                };
                (actual == v) != *neg
            })
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum EvType {
    Added,
    Modified,
    Deleted,
}

struct Event {
    rv: u64,
    res: usize,
    ty: EvType,
    obj: Arc<Obj>,
    prev: Option<Arc<Obj>>,
}

/// The watch history is gone up to here (`rv` of the last dropped event).
pub(crate) struct Expired;

type Key = (Box<str>, Box<str>);

pub(crate) struct Store {
    pub rv: u64,
    objects: Vec<BTreeMap<Key, Arc<Obj>>>,
    history: VecDeque<Event>,
    history_cap: usize,
    pub compacted: u64,
    hasher: RandomState,
    uids: u64,
}

/// How a write treats the stored object's `status`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// A write through the main resource: status is kept from the old object.
    Main,
    /// A write through `/status`: spec is kept from the old object.
    Status,
    /// The test's own writes: everything as given.
    All,
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn line(out: &mut Vec<u8>, ty: &str, json: &[u8]) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(ty.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    out.extend_from_slice(json);
    out.extend_from_slice(b"}\n");
}

pub(crate) fn bookmark(out: &mut Vec<u8>, res: &Resource, rv: u64, initial_end: bool) {
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        meta["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    let obj = json!({ "kind": res.kind, "apiVersion": res.api_version(), "metadata": meta });
    line(out, "BOOKMARK", &serde_json::to_vec(&obj).expect("json"));
}

pub(crate) const EXPIRED_LINE: &[u8] = b"{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"apiVersion\":\"v1\",\
\"metadata\":{},\"status\":\"Failure\",\"message\":\"too old resource version\",\"reason\":\"Expired\",\"code\":410}}\n";

impl Store {
    pub fn new(history_cap: usize) -> Store {
        Store {
            rv: 0,
            objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            compacted: 0,
            hasher: RandomState::new(),
            uids: 0,
        }
    }

    pub fn get(&self, res: usize, ns: &str, name: &str) -> Option<Arc<Obj>> {
        self.objects[res].get(&(ns.into(), name.into())).cloned()
    }

    /// One page: objects after `after` (exclusive) in key order, at most
    /// `limit`; and whether more follow (with how many).
    pub fn list(
        &self,
        res: usize,
        ns: Option<&str>,
        sel: &Selector,
        limit: usize,
        after: Option<(&str, &str)>,
    ) -> (Vec<Arc<Obj>>, usize) {
        use std::ops::Bound;
        let start = match after {
            Some((a, b)) => Bound::Excluded((a.into(), b.into())),
            None => Bound::Unbounded,
        };
        let mut items = Vec::new();
        let mut remaining = 0;
        for o in self.objects[res].range::<Key, _>((start, Bound::Unbounded)).map(|(_, o)| o) {
            if ns.is_some_and(|ns| *o.ns != *ns) || !sel.matches(o) {
                continue;
            }
            if items.len() < limit {
                items.push(o.clone());
            } else {
                remaining += 1;
            }
        }
        (items, remaining)
    }

    pub fn len(&self) -> usize {
        self.objects.iter().map(BTreeMap::len).sum()
    }

    fn uid(&mut self) -> String {
        self.uids += 1;
        let a = self.hasher.hash_one((self.uids, std::time::SystemTime::now()));
        let b = self.hasher.hash_one(a);
        let h = format!("{a:016x}{b:016x}");
        format!("{}-{}-4{}-8{}-{}", &h[..8], &h[8..12], &h[13..16], &h[17..20], &h[20..])
    }

    fn push(&mut self, ev: Event) {
        if self.history.len() >= self.history_cap {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        self.history.push_back(ev);
    }

    /// Drop the whole history: a watch from any earlier resourceVersion
    /// gets 410 Expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Normalize and store `v` (already validated) as the new state of the
    /// object, with the next resourceVersion.
    fn commit(&mut self, res: usize, mut v: Value, prev: Option<Arc<Obj>>, dry_run: bool) -> Arc<Obj> {
        let r = &RESOURCES[res];
        v["apiVersion"] = json!(r.api_version());
        v["kind"] = json!(r.kind);
        let rv = if dry_run { self.rv } else { self.rv + 1 };
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = Arc::new(Obj::new(r, &v, rv));
        if dry_run {
            return obj;
        }
        self.rv = rv;
        let key = (obj.ns.clone(), obj.name.clone());
        self.objects[res].insert(key, obj.clone());
        let ty = if prev.is_some() { EvType::Modified } else { EvType::Added };
        self.push(Event { rv, res, ty, obj: obj.clone(), prev });
        obj
    }

    fn remove(&mut self, res: usize, old: &Obj, dry_run: bool) -> Arc<Obj> {
        let r = &RESOURCES[res];
        if dry_run {
            return Arc::new(old.with_rv(r, old.rv));
        }
        self.rv += 1;
        let gone = Arc::new(old.with_rv(r, self.rv));
        self.objects[res].remove(&(old.ns.clone(), old.name.clone()));
        self.push(Event { rv: self.rv, res, ty: EvType::Deleted, obj: gone.clone(), prev: None });
        gone
    }

    /// Check and fill in `metadata` for a create in namespace `ns` ("" for
    /// cluster-scoped). Returns the name.
    fn prepare(&mut self, res: usize, ns: &str, v: &mut Value) -> Result<String, ApiError> {
        let r = &RESOURCES[res];
        let Some(obj) = v.as_object_mut() else { return Err(ApiError::bad_request("the body is not a JSON object")) };
        for (field, want) in [("apiVersion", r.api_version()), ("kind", r.kind.to_string())] {
            match obj.get(field).and_then(Value::as_str) {
                Some(got) if !got.is_empty() && got != want => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} in the data ({got}) does not match the expected {field} ({want})"
                    )));
                }
                _ => {}
            }
        }
        let meta = obj.entry("metadata").or_insert_with(|| Value::Object(Map::new()));
        let Some(meta) = meta.as_object_mut() else { return Err(ApiError::bad_request("metadata is not an object")) };
        match meta.get("namespace").and_then(Value::as_str) {
            Some(got) if r.namespaced && !got.is_empty() && got != ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ if r.namespaced => {
                meta.insert("namespace".into(), json!(ns));
            }
            _ => {
                meta.remove("namespace");
            }
        }
        Ok(meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string())
    }

    pub fn create(&mut self, res: usize, ns: &str, mut v: Value, dry_run: bool) -> Result<Arc<Obj>, ApiError> {
        let mut name = self.prepare(res, ns, &mut v)?;
        if name.is_empty() {
            let Some(prefix) = v["metadata"]["generateName"].as_str().filter(|p| !p.is_empty()) else {
                return Err(ApiError::new(422, "Invalid", "name or generateName is required"));
            };
            let suffix: String = self.uid().chars().filter(char::is_ascii_alphanumeric).take(5).collect();
            name = format!("{prefix}{suffix}");
            v["metadata"]["name"] = json!(name);
        }
        if self.get(res, ns, &name).is_some() {
            return Err(ApiError::about(res, &name, 409, "AlreadyExists", "already exists"));
        }
        let meta = &mut v["metadata"];
        meta["uid"] = json!(self.uid());
        meta["creationTimestamp"] = json!(now());
        for gone in ["deletionTimestamp", "resourceVersion"] {
            meta.as_object_mut().expect("object").remove(gone);
        }
        Ok(self.commit(res, v, None, dry_run))
    }

    /// Replace an existing object. A non-empty `metadata.resourceVersion`
    /// in `v` must be the current one (optimistic concurrency).
    pub fn update(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        mut v: Value,
        part: Part,
        dry_run: bool,
    ) -> Result<Arc<Obj>, ApiError> {
        let got = self.prepare(res, ns, &mut v)?;
        if !got.is_empty() && got != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({got}) does not match the name on the URL ({name})"
            )));
        }
        let old = self.get(res, ns, name).ok_or_else(|| ApiError::not_found(res, name))?;
        let stale =
            v["metadata"]["resourceVersion"].as_str().is_some_and(|rv| !rv.is_empty() && rv != old.rv.to_string());
        if stale && part != Part::All {
            return Err(ApiError::conflict(res, name));
        }
        let oldv = old.value();
        let keep = |v: &mut Value, field: &str| match oldv.get(field) {
            Some(f) => v[field] = f.clone(),
            None => drop(v.as_object_mut().map(|m| m.remove(field))),
        };
        match part {
            Part::Main if RESOURCES[res].status => keep(&mut v, "status"),
            Part::Status => keep(&mut v, "spec"),
            _ => {}
        }
        v["metadata"]["name"] = json!(name);
        for fixed in ["uid", "creationTimestamp", "deletionTimestamp"] {
            match &oldv["metadata"][fixed] {
                Value::Null if fixed == "deletionTimestamp" && part == Part::All => {}
                Value::Null => drop(v["metadata"].as_object_mut().map(|m| m.remove(fixed))),
                old => v["metadata"][fixed] = old.clone(),
            }
        }
        let finalizers_done = v["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty);
        if !v["metadata"]["deletionTimestamp"].is_null() && finalizers_done {
            return Ok(self.remove(res, &old, dry_run));
        }
        Ok(self.commit(res, v, Some(old), dry_run))
    }

    /// Delete: at once, or (with finalizers) mark it with a
    /// deletionTimestamp. Returns the object and whether it is gone.
    pub fn delete(
        &mut self,
        res: usize,
        ns: &str,
        name: &str,
        precondition: (Option<&str>, Option<&str>),
        dry_run: bool,
    ) -> Result<(Arc<Obj>, bool), ApiError> {
        let old = self.get(res, ns, name).ok_or_else(|| ApiError::not_found(res, name))?;
        let mut v = old.value();
        let (want_rv, want_uid) = precondition;
        if want_rv.is_some_and(|rv| rv != old.rv.to_string())
            || want_uid.is_some_and(|uid| Some(uid) != v["metadata"]["uid"].as_str())
        {
            return Err(ApiError::conflict(res, name));
        }
        if v["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty) {
            return Ok((self.remove(res, &old, dry_run), true));
        }
        if v["metadata"]["deletionTimestamp"].is_null() {
            v["metadata"]["deletionTimestamp"] = json!(now());
            return Ok((self.commit(res, v, Some(old), dry_run), false));
        }
        Ok((old, false))
    }

    /// The test's create-or-replace: no preconditions, status as given.
    pub fn put(&mut self, res: usize, v: Value) -> Result<Arc<Obj>, ApiError> {
        let ns = if RESOURCES[res].namespaced { v["metadata"]["namespace"].as_str().unwrap_or("default") } else { "" };
        let ns = ns.to_string();
        let name = v["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match self.get(res, &ns, &name) {
            Some(_) => self.update(res, &ns, &name, v, Part::All, false),
            None => self.create(res, &ns, v, false),
        }
    }

    pub fn force_remove(&mut self, res: usize, ns: &str, name: &str) -> Option<Arc<Obj>> {
        let old = self.get(res, ns, name)?;
        Some(self.remove(res, &old, false))
    }

    /// ADDED lines for every matching object now; returns the current rv.
    pub fn snapshot(&self, res: usize, ns: Option<&str>, sel: &Selector, out: &mut Vec<u8>) -> u64 {
        for o in self.objects[res].values() {
            if ns.is_none_or(|ns| *o.ns == *ns) && sel.matches(o) {
                line(out, "ADDED", &o.json);
            }
        }
        self.rv
    }

    /// Lines for the events after `since`, filtered as the real watch cache
    /// does (an object that stops matching is sent as DELETED); returns the
    /// resourceVersion the watcher has now seen.
    pub fn events_since(
        &self,
        res: usize,
        ns: Option<&str>,
        sel: &Selector,
        since: u64,
        out: &mut Vec<u8>,
    ) -> Result<u64, Expired> {
        if since < self.compacted {
            return Err(Expired);
        }
        let r = &RESOURCES[res];
        let start = self.history.partition_point(|e| e.rv <= since);
        for e in self.history.range(start..) {
            if e.res != res || ns.is_some_and(|ns| *e.obj.ns != *ns) {
                continue;
            }
            let now = sel.matches(&e.obj);
            let before = e.prev.as_ref().map(|p| sel.matches(p));
            match (e.ty, now, before) {
                (EvType::Added, true, _) => line(out, "ADDED", &e.obj.json),
                (EvType::Deleted, true, _) => line(out, "DELETED", &e.obj.json),
                (EvType::Modified, true, Some(true)) => line(out, "MODIFIED", &e.obj.json),
                (EvType::Modified, true, _) => line(out, "ADDED", &e.obj.json),
                (EvType::Modified, false, Some(true)) => {
                    let prev = e.prev.as_ref().expect("prev").with_rv(r, e.rv);
                    line(out, "DELETED", &prev.json)
                }
                _ => {}
            }
        }
        Ok(self.rv.max(since))
    }
}

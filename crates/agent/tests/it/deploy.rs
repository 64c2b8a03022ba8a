//! The deployment files: `deploy/kubernetes/*.yaml`, the Helm chart in
//! `deploy/helm/soda-syncer` and the `Dockerfile`.
//!
//! No cluster, no Helm and no Docker can be installed here, so this checks
//! what can be checked without them, strictly:
//! - every YAML document parses into its k8s-openapi type (dispatch on
//!   apiVersion + kind; an unknown kind fails), and serializing the typed
//!   value back loses no field of the original: k8s-openapi ignores unknown
//!   fields, so this is what catches a typo such as `mountPropogation`;
//! - the chart, rendered by a checker for the small template subset it uses
//!   (below; it is not Helm), with its default values is the plain manifests;
//! - the DaemonSet has what the agent needs (downward API, kubelet root with
//!   HostToContainer, hostPort 50030, every taint tolerated, the
//!   capabilities and nothing more), the RBAC rules are exactly a reviewed
//!   table, and the real binary accepts the DaemonSet's arguments;
//! - the Dockerfile's structure (Docker cannot be installed here; image.rs
//!   builds and runs the same image from scripts/image with podman).
//!
//! After changing the chart, regenerate the plain manifests with
//! `SODA_SYNCER_BLESS_DEPLOY=1 cargo nextest run -p soda-syncer --test it deploy`.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RELEASE: &str = "soda-syncer";
const NAMESPACE: &str = "soda-syncer";
/// The chart's templates, in the order the plain manifest lists them.
const TEMPLATES: &[&str] = &["serviceaccount.yaml", "secret.yaml", "rbac.yaml", "daemonset.yaml", "maintainer.yaml"];
/// The plain manifest made from the chart; the other file there is the Namespace.
const GENERATED: &str = "10-soda-syncer.yaml";
const NAMESPACE_FILE: &str = "00-namespace.yaml";
const PORT: i32 = 50030;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}
fn chart_dir() -> PathBuf {
    repo().join("deploy/helm/soda-syncer")
}
fn plain_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}
fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ---------------------------------------------------------------------------
// A template subset checker. NOT Helm: it implements exactly what the chart
// uses, with Go template whitespace trimming (`{{-`, `-}}`):
//   {{ .Values.a.b }}  {{ .Release.Name }}  {{ .Release.Namespace }}
//   {{ .Values.x | quote }}  {{ toYaml .Values.x | nindent N }}  (| indent N)
//   {{- if .Values.x }} ... {{- end }}   (Go truthiness: false, 0, "", [], {}, null are false)
// Anything else is an error, so a template that strays from the subset (and
// might render differently in Helm) fails here. Unlike Helm, a value missing
// from values.yaml is an error rather than an empty string.
// ---------------------------------------------------------------------------
mod tpl {
    use serde_json::Value;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    #[derive(Debug)]
    enum Node {
        Text(String),
        Print { head: Head, filters: Vec<Filter> },
        If { cond: Vec<String>, body: Vec<Node> },
    }

    #[derive(Debug)]
    enum Head {
        Value(Vec<String>),
        ToYaml(Vec<String>),
    }

    #[derive(Debug)]
    enum Filter {
        Quote,
        Nindent(usize),
        Indent(usize),
    }

    pub struct Ctx {
        pub values: Value,
        pub release_name: String,
        pub release_namespace: String,
        /// Every `.Values` path looked up, to find values nothing uses.
        pub used: RefCell<BTreeSet<String>>,
    }

    enum Tok {
        Text(String),
        Action(String),
    }

    fn lex(src: &str) -> Result<Vec<Tok>, String> {
        let mut out = Vec::new();
        let mut rest = src;
        let mut trim_next = false;
        while let Some(i) = rest.find("{{") {
            let mut text = &rest[..i];
            if trim_next {
                text = text.trim_start();
            }
            let mut after = &rest[i + 2..];
            if let Some(a) = after.strip_prefix("- ") {
                text = text.trim_end();
                after = a;
            }
            out.push(Tok::Text(text.to_string()));
            let j = after.find("}}").ok_or("a {{ without }}")?;
            let mut action = &after[..j];
            trim_next = false;
            if let Some(a) = action.strip_suffix(" -") {
                action = a;
                trim_next = true;
            }
            out.push(Tok::Action(action.trim().to_string()));
            rest = &after[j + 2..];
        }
        out.push(Tok::Text(if trim_next { rest.trim_start() } else { rest }.to_string()));
        Ok(out)
    }

    fn path(s: &str) -> Result<Vec<String>, String> {
        let s = s.trim();
        let parts: Vec<String> = s
            .strip_prefix('.')
            .ok_or(format!("{s:?}: not a .Values/.Release path"))?
            .split('.')
            .map(str::to_string)
            .collect();
        let ok_segment = |p: &String| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match parts.first().map(String::as_str) {
            Some("Values") if parts.len() > 1 && parts.iter().all(ok_segment) => Ok(parts),
            Some("Release") if parts.len() == 2 && (parts[1] == "Name" || parts[1] == "Namespace") => Ok(parts),
            _ => Err(format!("{s:?} is outside the subset (.Values.x, .Release.Name, .Release.Namespace)")),
        }
    }

    fn pipeline(a: &str) -> Result<Node, String> {
        let mut cmds = a.split('|').map(str::trim);
        let first = cmds.next().unwrap_or_default();
        let head = match first.strip_prefix("toYaml ") {
            Some(p) => Head::ToYaml(path(p)?),
            None => Head::Value(path(first)?),
        };
        let filters = cmds
            .map(|c| {
                let mut w = c.split_whitespace();
                let n = |w: Option<&str>| w.and_then(|n| n.parse().ok()).ok_or(format!("{c:?}: a number is missing"));
                match (w.next(), w.clone().count()) {
                    (Some("quote"), 0) => Ok(Filter::Quote),
                    (Some("nindent"), 1) => Ok(Filter::Nindent(n(w.next())?)),
                    (Some("indent"), 1) => Ok(Filter::Indent(n(w.next())?)),
                    _ => Err(format!("{c:?} is outside the subset (quote, nindent N, indent N)")),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Node::Print { head, filters })
    }

    fn parse(src: &str) -> Result<Vec<Node>, String> {
        let mut stack: Vec<(Option<Vec<String>>, Vec<Node>)> = vec![(None, Vec::new())];
        for tok in lex(src)? {
            match tok {
                Tok::Text(t) => stack.last_mut().expect("root").1.push(Node::Text(t)),
                Tok::Action(a) => {
                    if let Some(cond) = a.strip_prefix("if ") {
                        stack.push((Some(path(cond)?), Vec::new()));
                    } else if a == "end" {
                        let (cond, body) = stack.pop().expect("root");
                        let cond = cond.ok_or("an {{ end }} without {{ if }}")?;
                        stack.last_mut().ok_or("an {{ end }} without {{ if }}")?.1.push(Node::If { cond, body });
                    } else {
                        let node = pipeline(&a)?;
                        stack.last_mut().expect("root").1.push(node);
                    }
                }
            }
        }
        if stack.len() != 1 {
            return Err("an {{ if }} without {{ end }}".into());
        }
        Ok(stack.pop().expect("root").1)
    }

    impl Ctx {
        fn lookup(&self, p: &[String]) -> Result<Value, String> {
            let dotted = format!(".{}", p.join("."));
            if p[0] == "Release" {
                let v = if p[1] == "Name" { &self.release_name } else { &self.release_namespace };
                return Ok(Value::String(v.clone()));
            }
            self.used.borrow_mut().insert(p[1..].join("."));
            let mut v = &self.values;
            for seg in &p[1..] {
                v = v.get(seg).ok_or(format!("{dotted} is not in values.yaml"))?;
            }
            Ok(v.clone())
        }

        fn render_nodes(&self, nodes: &[Node], out: &mut String) -> Result<(), String> {
            for node in nodes {
                match node {
                    Node::Text(t) => out.push_str(t),
                    Node::If { cond, body } => {
                        if truthy(&self.lookup(cond)?) {
                            self.render_nodes(body, out)?;
                        }
                    }
                    Node::Print { head, filters } => {
                        let mut s = match head {
                            Head::Value(p) => match self.lookup(p)? {
                                Value::String(s) => s,
                                Value::Number(n) => n.to_string(),
                                Value::Bool(b) => b.to_string(),
                                other => {
                                    return Err(format!(
                                        ".{} is {other}: print maps and lists with toYaml",
                                        p.join(".")
                                    ))
                                }
                            },
                            Head::ToYaml(p) => {
                                let v = self.lookup(p)?;
                                serde_yaml::to_string(&v).map_err(|e| e.to_string())?.trim_end_matches('\n').to_string()
                            }
                        };
                        for f in filters {
                            s = match f {
                                Filter::Quote => serde_json::to_string(&s).expect("a string"),
                                Filter::Nindent(n) => format!("\n{}", indent(&s, *n)),
                                Filter::Indent(n) => indent(&s, *n),
                            };
                        }
                        out.push_str(&s);
                    }
                }
            }
            Ok(())
        }

        pub fn render(&self, src: &str) -> Result<String, String> {
            let nodes = parse(src)?;
            let mut out = String::new();
            self.render_nodes(&nodes, &mut out)?;
            Ok(out)
        }
    }

    /// Sprig's indent: every line, the first too, gets `n` spaces.
    fn indent(s: &str, n: usize) -> String {
        let pad = " ".repeat(n);
        format!("{pad}{}", s.replace('\n', &format!("\n{pad}")))
    }

    fn truthy(v: &Value) -> bool {
        match v {
            Value::Null => false,
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
        }
    }
}

/// YAML documents of a text as JSON values; empty documents are skipped.
fn yaml_docs(text: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{origin}: not YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn chart_values() -> Value {
    let p = chart_dir().join("values.yaml");
    yaml_docs(&read(&p), "values.yaml").pop().expect("values.yaml has a document")
}

/// Deep merge: `over` replaces scalars and lists, merges maps.
fn merged(mut base: Value, over: &Value) -> Value {
    match (&mut base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                let cur = b.remove(k).unwrap_or(Value::Null);
                b.insert(k.clone(), if cur.is_object() { merged(cur, v) } else { v.clone() });
            }
            base
        }
        _ => over.clone(),
    }
}

/// Render the chart with values.yaml overridden by `over`: the text of the
/// whole manifest (templates in `TEMPLATES` order) and the values paths used.
fn render_chart(over: &Value) -> (String, BTreeSet<String>) {
    let found: BTreeSet<String> = std::fs::read_dir(chart_dir().join("templates"))
        .expect("templates")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    let listed: BTreeSet<String> = TEMPLATES.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, listed, "templates/ and TEMPLATES in deploy.rs must list the same files");
    let ctx = tpl::Ctx {
        values: merged(chart_values(), over),
        release_name: RELEASE.into(),
        release_namespace: NAMESPACE.into(),
        used: Default::default(),
    };
    let parts: Vec<String> = TEMPLATES
        .iter()
        .map(|t| {
            let src = read(&chart_dir().join("templates").join(t));
            ctx.render(&src).unwrap_or_else(|e| panic!("templates/{t}: {e}")).trim().to_string()
        })
        .filter(|s| !s.is_empty())
        .collect();
    (format!("{}\n", parts.join("\n---\n")), ctx.used.into_inner())
}

// ---------------------------------------------------------------------------
// Typed parsing.
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum Obj {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Secret(Secret),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
}

/// Fields of `orig` that are missing or different in `back`.
fn lost_fields(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                match b.get(k) {
                    Some(bv) => lost_fields(v, bv, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (x, y)) in o.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        (x, y) if x == y => {}
        (x, y) => out.push(format!("{path} ({x} became {y})")),
    }
}

fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let t: T = serde_path_to_error::deserialize(doc).map_err(|e| format!("at {}: {}", e.path(), e.inner()))?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    if !lost.is_empty() {
        let kind = std::any::type_name::<T>().rsplit("::").next().unwrap_or_default();
        return Err(format!("fields the {kind} type does not have (a typo?) or reads differently: {lost:?}"));
    }
    Ok(t)
}

fn to_typed(doc: &Value) -> Result<Obj, String> {
    let api = doc.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
    macro_rules! dispatch {
        ($($t:ident),*) => {
            $(
                if api == <$t as Resource>::API_VERSION && kind == <$t as Resource>::KIND {
                    return typed::<$t>(doc).map(|t| Obj::$t(t.into()));
                }
            )*
        };
    }
    dispatch!(
        Namespace,
        ServiceAccount,
        Secret,
        ClusterRole,
        ClusterRoleBinding,
        Role,
        RoleBinding,
        DaemonSet,
        Deployment
    );
    Err(format!("apiVersion {api:?} kind {kind:?} is not a kind this test knows: add it to to_typed (and check it)"))
}

/// Values a YAML 1.1 parser (kubectl, Helm: sigs.k8s.io/yaml) reads
/// differently from serde_yaml's YAML 1.2: unquoted yes/no/on/off are
/// booleans, and a leading zero makes an octal number.
fn yaml11_traps(text: &str, origin: &str) -> Vec<String> {
    const BOOLS: &[&str] =
        &["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"];
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with('#') {
            continue;
        }
        let value = match code.split_once(": ") {
            Some((_, v)) => v,
            None => code.strip_prefix("- ").unwrap_or(""),
        };
        let value = value.split(" #").next().unwrap_or_default().trim();
        let octal = value.len() > 1 && value.starts_with('0') && value.chars().all(|c| c.is_ascii_digit());
        if octal || BOOLS.contains(&value) {
            out.push(format!("{origin}:{}: {value:?} means something else to kubectl (YAML 1.1)", i + 1));
        }
    }
    out
}

#[derive(Debug)]
struct Bundle {
    /// (where, parsed document)
    docs: Vec<(String, Value)>,
    objs: Vec<Obj>,
}

fn bundle(texts: &[(String, String)]) -> Result<Bundle, Vec<String>> {
    let mut problems = Vec::new();
    let mut b = Bundle { docs: Vec::new(), objs: Vec::new() };
    for (origin, text) in texts {
        problems.extend(yaml11_traps(text, origin));
        for (i, doc) in yaml_docs(text, origin).into_iter().enumerate() {
            let at = format!("{origin} document {}", i + 1);
            match to_typed(&doc) {
                Ok(o) => b.objs.push(o),
                Err(e) => problems.push(format!("{at}: {e}")),
            }
            b.docs.push((at, doc));
        }
    }
    if problems.is_empty() {
        Ok(b)
    } else {
        Err(problems)
    }
}

fn plain_texts() -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(plain_dir())
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files.iter().map(|p| (format!("deploy/kubernetes/{}", p.file_name().unwrap().to_string_lossy()), read(p))).collect()
}

fn plain() -> Bundle {
    bundle(&plain_texts()).unwrap_or_else(|p| panic!("deploy/kubernetes:\n{}", p.join("\n")))
}

fn chart(over: &Value) -> Bundle {
    let (text, _) = render_chart(over);
    bundle(&[(format!("chart rendered with {over}"), text)])
        .unwrap_or_else(|p| panic!("the rendered chart:\n{}", p.join("\n")))
}

macro_rules! one {
    ($b:expr, $v:ident) => {{
        let all: Vec<_> = $b.objs.iter().filter_map(|o| if let Obj::$v(x) = o { Some(x) } else { None }).collect();
        assert_eq!(all.len(), 1, "exactly one {}", stringify!($v));
        all[0]
    }};
}

/// The chart's DaemonSet rendered with values.yaml overridden by `over`,
/// and the files of the chart's own Secrets as the kubelet would mount
/// them (path in the container -> content): what the image test runs.
pub(crate) fn rendered_daemonset(over: &Value) -> (DaemonSet, BTreeMap<String, String>) {
    let b = chart(over);
    let ds = one!(b, DaemonSet).as_ref().clone();
    (ds, secret_files(&b))
}

// ---------------------------------------------------------------------------
// What the objects must say.
// ---------------------------------------------------------------------------

/// The reviewed permissions: (apiGroup, resource, verb). An added
/// permission fails until it is added here, after review.
fn cluster_table(read_claim_secrets: bool, pod_hooks: bool) -> BTreeSet<(String, String, String)> {
    let mut rows: Vec<(&str, &str, &str)> = Vec::new();
    for r in ["pods", "persistentvolumes", "nodes"] {
        rows.extend(["get", "list", "watch"].map(|v| ("", r, v)));
    }
    rows.extend(["get", "list", "watch", "patch"].map(|v| ("", "persistentvolumeclaims", v)));
    for r in ["storageclasses", "csidrivers", "csinodes"] {
        rows.extend(["get", "list", "watch"].map(|v| ("storage.k8s.io", r, v)));
    }
    rows.extend(["create", "patch"].map(|v| ("events.k8s.io", "events", v)));
    // Only for application hooks (pod annotations run through exec).
    if pod_hooks {
        rows.extend(["create", "get"].map(|v| ("", "pods/exec", v)));
    }
    if read_claim_secrets {
        rows.push(("", "secrets", "get"));
    }
    rows.into_iter().map(|(g, r, v)| (g.into(), r.into(), v.into())).collect()
}

fn namespace_table() -> BTreeSet<(String, String, String)> {
    let mut rows: Vec<(&str, &str, &str)> = Vec::new();
    rows.extend(["get", "list", "watch", "create", "update"].map(|v| ("", "secrets", v)));
    rows.extend(["get", "list", "watch", "create", "update", "delete"].map(|v| ("coordination.k8s.io", "leases", v)));
    rows.extend(["get", "create", "update"].map(|v| ("", "configmaps", v)));
    rows.into_iter().map(|(g, r, v)| (g.into(), r.into(), v.into())).collect()
}

fn granted(rules: &[PolicyRule]) -> Result<BTreeSet<(String, String, String)>, String> {
    let mut out = BTreeSet::new();
    for r in rules {
        if r.resource_names.is_some() || r.non_resource_urls.is_some() {
            return Err(format!("a rule with resourceNames or nonResourceURLs is not in the table: {r:?}"));
        }
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    Ok(out)
}

fn check_rbac(b: &Bundle, read_claim_secrets: bool, pod_hooks: bool) -> Vec<String> {
    let mut p = Vec::new();
    let sa = one!(b, ServiceAccount);
    let sa_name = sa.metadata.name.clone().unwrap_or_default();
    let sa_ns = sa.metadata.namespace.clone().unwrap_or_default();
    let cr = one!(b, ClusterRole);
    match granted(cr.rules.as_deref().unwrap_or_default()) {
        Ok(g) if g == cluster_table(read_claim_secrets, pod_hooks) => {}
        Ok(g) => {
            let want = cluster_table(read_claim_secrets, pod_hooks);
            p.push(format!(
                "ClusterRole differs from the reviewed table: extra {:?}, missing {:?}",
                g.difference(&want).collect::<Vec<_>>(),
                want.difference(&g).collect::<Vec<_>>()
            ));
        }
        Err(e) => p.push(e),
    }
    if cr.aggregation_rule.is_some() {
        p.push("the ClusterRole must not aggregate other roles".into());
    }
    let role = one!(b, Role);
    match granted(role.rules.as_deref().unwrap_or_default()) {
        Ok(g) if g == namespace_table() => {}
        Ok(g) => p.push(format!("Role differs from the reviewed table: {g:?}")),
        Err(e) => p.push(e),
    }
    if role.metadata.namespace.as_deref() != Some(sa_ns.as_str()) {
        p.push("the Role must be in the agent's namespace".into());
    }
    let subject_ok = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        matches!(subjects.as_deref(), Some([s]) if s.kind == "ServiceAccount"
            && s.name == sa_name && s.namespace.as_deref() == Some(sa_ns.as_str()))
    };
    let crb = one!(b, ClusterRoleBinding);
    if crb.role_ref.kind != "ClusterRole" || Some(&crb.role_ref.name) != cr.metadata.name.as_ref() {
        p.push("the ClusterRoleBinding must bind the ClusterRole".into());
    }
    if !subject_ok(&crb.subjects) {
        p.push("the ClusterRoleBinding's only subject must be the agent's ServiceAccount".into());
    }
    let rb = one!(b, RoleBinding);
    if rb.role_ref.kind != "Role"
        || Some(&rb.role_ref.name) != role.metadata.name.as_ref()
        || rb.metadata.namespace != role.metadata.namespace
    {
        p.push("the RoleBinding must bind the Role in its namespace".into());
    }
    if !subject_ok(&rb.subjects) {
        p.push("the RoleBinding's only subject must be the agent's ServiceAccount".into());
    }
    p
}

/// What the values ask of the DaemonSet.
struct Expect {
    caps: BTreeSet<&'static str>,
    privileged: bool,
    apparmor_unconfined: bool,
    tls: bool,
    secrets_key: bool,
}

impl Expect {
    fn from_values(v: &Value) -> Expect {
        let on = |p: &str| {
            v.pointer(p).is_some_and(|x| x.as_bool() == Some(true) || x.as_str().is_some_and(|s| !s.is_empty()))
        };
        let mut caps = BTreeSet::from(["DAC_READ_SEARCH"]);
        if on("/privileges/restore") {
            caps.extend(["CHOWN", "FOWNER", "FSETID", "DAC_OVERRIDE"]);
        }
        if on("/privileges/consistency") {
            caps.insert("SYS_ADMIN");
        }
        Expect {
            caps,
            privileged: on("/privileges/privileged"),
            apparmor_unconfined: on("/privileges/consistency"),
            tls: on("/tls/secretName"),
            secrets_key: on("/apiSecret/useSecretsKey"),
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().find_map(|a| a.strip_prefix(&format!("{name}=")).map(str::to_string))
}

fn check_daemonset(b: &Bundle, x: &Expect) -> Vec<String> {
    let mut p = Vec::new();
    let ds = one!(b, DaemonSet);
    let spec = &ds.spec;
    let labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    for (k, v) in spec.selector.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            p.push(format!("the selector's {k}={v} is not on the pod template"));
        }
    }
    let pod: &PodSpec = spec.template.spec.as_ref().expect("pod spec");
    let sa = one!(b, ServiceAccount);
    if pod.service_account_name != sa.metadata.name {
        p.push("serviceAccountName is not the ServiceAccount".into());
    }
    if pod.host_network == Some(true) || pod.host_pid == Some(true) || pod.host_ipc == Some(true) {
        p.push("no hostNetwork, hostPID or hostIPC: the agent needs none of them".into());
    }
    if !pod
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none() && t.value.is_none())
    {
        p.push("every taint must be tolerated (operator: Exists, no key, no effect)".into());
    }
    let pod_root = pod.security_context.as_ref().and_then(|s| s.run_as_user) == Some(0);
    let [c]: &[Container; 1] = match pod.containers.as_slice().try_into() {
        Ok(c) => c,
        Err(_) => return vec!["exactly one container".into()],
    };
    let sc = c.security_context.clone().unwrap_or_default();
    if !(pod_root || sc.run_as_user == Some(0)) || sc.run_as_user.is_some_and(|u| u != 0) {
        p.push("the agent runs as root (runAsUser: 0)".into());
    }
    // Downward API.
    let env_field = |name: &str| {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    for (name, field) in
        [("NODE_NAME", "spec.nodeName"), ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")]
    {
        if env_field(name).as_deref() != Some(field) {
            p.push(format!("env {name} must come from the downward API fieldRef {field}"));
        }
    }
    // hostPort for soda-proxy.
    if !c.ports.iter().flatten().any(|port| {
        port.container_port == PORT
            && port.host_port == Some(PORT)
            && port.protocol.as_deref().unwrap_or("TCP") == "TCP"
    }) {
        p.push(format!("containerPort and hostPort {PORT}/TCP"));
    }
    // Volumes and their mounts.
    let args = c.args.clone().unwrap_or_default();
    let volumes: BTreeMap<String, &k8s_openapi::api::core::v1::Volume> =
        pod.volumes.iter().flatten().map(|v| (v.name.clone(), v)).collect();
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    for m in &mounts {
        if !volumes.contains_key(&m.name) {
            p.push(format!("volumeMount {} has no volume", m.name));
        }
    }
    for name in volumes.keys() {
        if !mounts.iter().any(|m| &m.name == name) {
            p.push(format!("volume {name} is not mounted"));
        }
    }
    let mount_at = |path: &str| mounts.iter().find(|m| m.mount_path == path);
    let host_path = |m: &k8s_openapi::api::core::v1::VolumeMount| {
        volumes
            .get(&m.name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| (h.path.clone(), h.type_.clone().unwrap_or_default()))
    };
    match flag(&args, "--kubelet-dir") {
        None => p.push("--kubelet-dir is not given".into()),
        Some(k) => match mount_at(&k) {
            None => p.push(format!("the kubelet root {k} is not mounted")),
            Some(m) => {
                if m.mount_propagation.as_deref() != Some("HostToContainer") {
                    p.push("the kubelet root must be mounted with mountPropagation: HostToContainer".into());
                }
                if m.read_only == Some(true) {
                    p.push("the kubelet root must be writable: restores write into volumes".into());
                }
                if host_path(m) != Some((k.clone(), "Directory".into())) {
                    p.push(format!("the kubelet root must be the hostPath {k} (type Directory) at the same path"));
                }
            }
        },
    }
    match flag(&args, "--state-dir") {
        None => p.push("--state-dir is not given".into()),
        Some(s) => match mount_at(&s) {
            Some(m) if host_path(m) == Some((s.clone(), "DirectoryOrCreate".into())) => {}
            _ => p.push(format!("the state directory must be the hostPath {s} (DirectoryOrCreate) at the same path")),
        },
    }
    if flag(&args, "--kubernetes").as_deref() != Some("on") {
        p.push("--kubernetes=on: in the DaemonSet, a missing service account must be an error".into());
    }
    // Files from Secrets: under a read-only mount of the right Secret.
    let secret_file = |flag_name: &str, secret: Option<&str>, p: &mut Vec<String>| {
        let Some(file) = flag(&args, flag_name) else {
            p.push(format!("{flag_name} is not given"));
            return;
        };
        let m = mounts.iter().find(|m| Path::new(&file).parent() == Some(Path::new(&m.mount_path)));
        let from =
            m.and_then(|m| volumes.get(&m.name)).and_then(|v| v.secret.as_ref()).and_then(|s| s.secret_name.clone());
        if m.is_none_or(|m| m.read_only != Some(true))
            || (secret.is_some() && from.as_deref() != secret)
            || from.is_none()
        {
            p.push(format!("{flag_name}={file} must lie in a read-only mount of the Secret {secret:?}"));
        }
    };
    let api_secret = b.objs.iter().find_map(|o| if let Obj::Secret(s) = o { s.metadata.name.clone() } else { None });
    secret_file("--token-file", api_secret.as_deref(), &mut p);
    if x.secrets_key {
        secret_file("--secrets-key-file", api_secret.as_deref(), &mut p);
    } else if flag(&args, "--secrets-key-file").is_some() {
        p.push("--secrets-key-file only with apiSecret.useSecretsKey".into());
    }
    if x.tls {
        secret_file("--tls-cert", None, &mut p);
        secret_file("--tls-key", None, &mut p);
    } else if flag(&args, "--tls-cert").is_some() {
        p.push("--tls-cert without tls.secretName".into());
    }
    // Security context.
    if sc.read_only_root_filesystem != Some(true) {
        p.push("readOnlyRootFilesystem: true".into());
    }
    match mount_at("/tmp") {
        Some(m) if volumes.get(&m.name).is_some_and(|v| v.empty_dir.is_some()) => {}
        _ => p.push("/tmp must be an emptyDir (the root filesystem is read-only)".into()),
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if caps.drop.as_deref() != Some(&["ALL".to_string()][..]) {
        p.push("capabilities.drop must be [ALL]".into());
    }
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    if added != x.caps {
        p.push(format!("capabilities.add is {added:?}, expected {:?}", x.caps));
    }
    if sc.privileged.unwrap_or(false) != x.privileged {
        p.push(format!("privileged must be {}", x.privileged));
    }
    let unconfined = sc.app_armor_profile.as_ref().is_some_and(|a| a.type_ == "Unconfined");
    if unconfined != x.apparmor_unconfined {
        p.push(format!("AppArmor unconfined must be {}", x.apparmor_unconfined));
    }
    // The API server rejects these combinations (validation of SecurityContext).
    if sc.allow_privilege_escalation == Some(false) && (sc.privileged == Some(true) || added.contains("SYS_ADMIN")) {
        p.push("allowPrivilegeEscalation: false with privileged or SYS_ADMIN is refused by the API server".into());
    }
    // Probes.
    for (which, probe, path) in
        [("liveness", &c.liveness_probe, "/healthz"), ("readiness", &c.readiness_probe, "/readyz")]
    {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let scheme = get.and_then(|g| g.scheme.clone()).unwrap_or_else(|| "HTTP".into());
        let ok = get.is_some_and(|g| g.path.as_deref() == Some(path) && g.port == IntOrString::Int(PORT))
            && scheme == if x.tls { "HTTPS" } else { "HTTP" };
        if !ok {
            p.push(format!("{which} probe: GET {path} on port {PORT} ({})", if x.tls { "HTTPS" } else { "HTTP" }));
        }
    }
    // Rollouts: one agent per state directory, and a stop that ends before the kubelet's SIGKILL.
    if !args.iter().any(|a| a == "--wait-for-state-lock") {
        p.push("--wait-for-state-lock: a new pod next to its predecessor waits for the state lock, not ready, instead of crash-looping".into());
    }
    match (pod.termination_grace_period_seconds, flag(&args, "--shutdown-grace-seconds")) {
        (Some(g), Some(f)) if f == g.to_string() && g >= 20 => {}
        (g, f) => p.push(format!(
            "terminationGracePeriodSeconds ({g:?}, at least 20: runs get all but 10 s) and --shutdown-grace-seconds ({f:?}) must be the same number"
        )),
    }
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    let surge = strategy.rolling_update.as_ref().and_then(|r| r.max_surge.clone());
    if strategy.type_.as_deref() != Some("RollingUpdate")
        || !matches!(&surge, None | Some(IntOrString::Int(0)))
            && !matches!(&surge, Some(IntOrString::String(s)) if s == "0" || s == "0%")
    {
        p.push(format!(
            "updateStrategy must be RollingUpdate with maxSurge 0 (got {strategy:?}): a surge pod waits for the old pod's state lock, is never ready, and the controller never deletes the old pod"
        ));
    }
    // Resources: a memory request and limit (restic's memory is the agent's risk).
    let res = c.resources.clone().unwrap_or_default();
    if !res.requests.as_ref().is_some_and(|r| r.contains_key("memory"))
        || !res.limits.as_ref().is_some_and(|r| r.contains_key("memory"))
    {
        p.push("resources: a memory request and a memory limit".into());
    }
    if args.first().is_none_or(|a| !a.starts_with("--")) {
        p.push("args are flags only: the image's entrypoint is `soda-syncer serve`".into());
    }
    p
}

/// `soda-syncer serve --help` of the real binary.
fn serve_help() -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_soda-syncer"))
        .args(["serve", "--help"])
        .output()
        .expect("run the binary");
    assert!(out.status.success(), "serve --help failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn unknown_flags(args: &[String], help: &str) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| format!("--{}", a.split('=').next().unwrap_or_default()))
        .filter(|f| {
            !help.lines().any(|l| {
                let l = l.trim_start();
                l.strip_prefix(f.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
            })
        })
        .collect()
}

fn container_args(b: &Bundle) -> Vec<String> {
    let ds = one!(b, DaemonSet);
    ds.spec.template.spec.as_ref().and_then(|p| p.containers.first()).and_then(|c| c.args.clone()).unwrap_or_default()
}

/// The files of the chart's own Secrets as the kubelet would mount them:
/// path in the container -> content.
fn secret_files(b: &Bundle) -> BTreeMap<String, String> {
    let ds = one!(b, DaemonSet);
    let pod = ds.spec.template.spec.as_ref().expect("pod spec");
    let mut out = BTreeMap::new();
    for o in &b.objs {
        let Obj::Secret(s) = o else { continue };
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.secret.as_ref().and_then(|x| x.secret_name.as_ref()) == s.metadata.name.as_ref());
        let mount = volume.and_then(|v| pod.containers[0].volume_mounts.iter().flatten().find(|m| m.name == v.name));
        if let Some(m) = mount {
            for (k, v) in s.string_data.iter().flatten() {
                out.insert(format!("{}/{k}", m.mount_path), v.clone());
            }
        }
    }
    out
}

/// Start the real binary with the DaemonSet's arguments, paths moved into a
/// temporary directory and the listener on loopback, outside a pod: it must
/// get past argument parsing and configuration checks (values such as the
/// CIDRs are real) and stop at the Kubernetes step, because `--kubernetes=on`
/// with no service account is an error. `files`: what the kubelet would put
/// at the paths the Secret volumes are mounted at.
fn agent_accepts(args: &[String], files: &BTreeMap<String, String>) -> Result<(), String> {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (path, content) in files {
        let p = tmp.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&p, content).expect("write");
    }
    let moved = |a: &String| -> String {
        for f in ["--kubelet-dir", "--state-dir", "--token-file", "--secrets-key-file", "--tls-cert", "--tls-key"] {
            if let Some(v) = a.strip_prefix(&format!("{f}=")) {
                let p = tmp.path().join(v.trim_start_matches('/'));
                if f.ends_with("-dir") {
                    std::fs::create_dir_all(&p).expect("mkdir");
                }
                return format!("{f}={}", p.display());
            }
        }
        if let Some(v) = a.strip_prefix("--allowed-root=") {
            return format!(
                "--allowed-root={}",
                v.split(',')
                    .map(|r| tmp.path().join(r.trim_start_matches('/')).display().to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        a.clone()
    };
    let mut argv: Vec<String> = vec!["serve".into()];
    argv.extend(args.iter().map(moved));
    argv.push("--listen=127.0.0.1:0".into());
    let log = tmp.path().join("agent.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_soda-syncer"))
        .args(&argv)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("SODA_SYNCER_KUBECONFIG")
        .env("NODE_NAME", "deploy-test-node")
        .env("POD_NAME", "soda-syncer-test")
        .env("POD_NAMESPACE", NAMESPACE)
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone().expect("log"))
        .stderr(logf)
        .spawn()
        .expect("start the agent");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the agent did not stop within 60 s with {argv:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = read(&log);
    if !status.success() && out.contains("Kubernetes is on, but this is not a pod") {
        Ok(())
    } else {
        Err(format!("with {argv:?} the agent ended with {status} and said:\n{out}"))
    }
}

// ---------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------

#[test]
fn plain_manifests_parse_into_the_kubernetes_types() {
    let b = plain();
    let names: Vec<String> =
        plain_texts().into_iter().map(|(n, _)| n.rsplit('/').next().unwrap_or_default().to_string()).collect();
    assert_eq!(names, [NAMESPACE_FILE, GENERATED], "deploy/kubernetes holds the Namespace and the rendered chart");
    let ns = one!(b, Namespace);
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
    let psa = ns.metadata.labels.as_ref().and_then(|l| l.get("pod-security.kubernetes.io/enforce"));
    assert_eq!(
        psa.map(String::as_str),
        Some("privileged"),
        "hostPath, hostPort and capabilities need the privileged Pod Security level"
    );
    for o in &b.objs {
        let ns = match o {
            Obj::ServiceAccount(x) => x.metadata.namespace.clone(),
            Obj::Secret(x) => x.metadata.namespace.clone(),
            Obj::Role(x) => x.metadata.namespace.clone(),
            Obj::RoleBinding(x) => x.metadata.namespace.clone(),
            Obj::DaemonSet(x) => x.metadata.namespace.clone(),
            Obj::Deployment(x) => x.metadata.namespace.clone(),
            Obj::Namespace(_) | Obj::ClusterRole(_) | Obj::ClusterRoleBinding(_) => continue,
        };
        assert_eq!(ns.as_deref(), Some(NAMESPACE), "every namespaced object is in {NAMESPACE}: {o:?}");
    }
    let problems = [check_rbac(&b, true, true), check_daemonset(&b, &Expect::from_values(&chart_values()))].concat();
    assert!(problems.is_empty(), "deploy/kubernetes:\n{}", problems.join("\n"));
}

#[test]
fn chart_with_default_values_renders_the_plain_manifests() {
    let (text, _) = render_chart(&json!({}));
    let path = plain_dir().join(GENERATED);
    if std::env::var_os("SODA_SYNCER_BLESS_DEPLOY").is_some() {
        let header = "# Generated from deploy/helm/soda-syncer with its default values (release\n\
                      # soda-syncer, namespace soda-syncer). Do not edit: change the chart, then run\n\
                      #   SODA_SYNCER_BLESS_DEPLOY=1 cargo nextest run -p soda-syncer --test it deploy\n\
                      # Apply 00-namespace.yaml first; kubectl apply -f deploy/kubernetes/ does.\n";
        std::fs::write(&path, format!("{header}{text}")).expect("write the plain manifest");
    }
    let key = |v: &Value| {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        format!("{} {} {}/{}", s("/apiVersion"), s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
    };
    let rendered: BTreeMap<String, Value> = chart(&json!({})).docs.into_iter().map(|(_, d)| (key(&d), d)).collect();
    let mut plain_docs: BTreeMap<String, Value> = plain().docs.into_iter().map(|(_, d)| (key(&d), d)).collect();
    plain_docs.remove(&format!("v1 Namespace /{NAMESPACE}")).expect("the plain manifests create the namespace");
    let keys = |m: &BTreeMap<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        keys(&plain_docs),
        keys(&rendered),
        "objects of deploy/kubernetes vs the chart; to regenerate: SODA_SYNCER_BLESS_DEPLOY=1"
    );
    for (k, want) in &rendered {
        let got = &plain_docs[k];
        // Both ways: a field only in the plain file, or only in the chart.
        let mut diff = Vec::new();
        lost_fields(want, got, "", &mut diff);
        lost_fields(got, want, "", &mut diff);
        diff.dedup();
        assert!(
            diff.is_empty(),
            "{k}: deploy/kubernetes differs from the chart at {diff:?}; to regenerate: SODA_SYNCER_BLESS_DEPLOY=1"
        );
    }
}

#[test]
fn rbac_is_exactly_the_reviewed_table() {
    let b = plain();
    let p = check_rbac(&b, true, true);
    assert!(p.is_empty(), "{}", p.join("\n"));
    // Without the cluster-wide Secret read, the only change is that rule.
    let without = chart(&json!({"readClaimSecrets": false}));
    let p = check_rbac(&without, false, true);
    assert!(p.is_empty(), "{}", p.join("\n"));
    // The check can fail: one more verb is caught.
    let mut docs: Vec<Value> = plain().docs.into_iter().map(|(_, d)| d).collect();
    for d in &mut docs {
        if d["kind"] == "ClusterRole" {
            d["rules"][0]["verbs"].as_array_mut().unwrap().push("delete".into());
        }
    }
    let text = docs.iter().map(|d| serde_yaml::to_string(d).unwrap()).collect::<Vec<_>>().join("---\n");
    let widened = bundle(&[("widened".into(), text)]).expect("still valid objects");
    let p = check_rbac(&widened, true, true);
    assert!(p.iter().any(|m| m.contains("delete")), "an added verb must be reported: {p:?}");
}

#[test]
fn daemonset_flags_are_the_agents() {
    let help = serve_help();
    for over in [json!({}), options()] {
        let b = chart(&over);
        let args = container_args(&b);
        let unknown = unknown_flags(&args, &help);
        assert!(unknown.is_empty(), "flags the agent does not have ({over}): {unknown:?}");
        agent_accepts(&args, &secret_files(&b)).unwrap_or_else(|e| panic!("{e}"));
    }
    // The check can fail.
    assert_eq!(unknown_flags(&["--kubelet-root=/x".into(), "--log-json".into()], &help), ["--kubelet-root"]);
    assert!(agent_accepts(&["--kubernetes=maybe".into()], &BTreeMap::new()).is_err());
}

/// Every option away from its default.
fn options() -> Value {
    json!({
        "privileges": {"consistency": false, "restore": false, "privileged": true},
        "readClaimSecrets": false,
        "podHooks": false,
        "tls": {"secretName": "agent-tls"},
        "allowedRoots": "/mnt/disks,/opt/local-path-provisioner",
        "extraVolumes": [
            {"name": "local-disks", "hostPath": {"path": "/mnt/disks", "type": "Directory"}},
            {"name": "local-path", "hostPath": {"path": "/opt/local-path-provisioner", "type": "Directory"}}
        ],
        "extraVolumeMounts": [
            {"name": "local-disks", "mountPath": "/mnt/disks", "mountPropagation": "HostToContainer"},
            {"name": "local-path", "mountPath": "/opt/local-path-provisioner", "mountPropagation": "HostToContainer"}
        ],
        "apiSecret": {"useSecretsKey": true, "secretsKey": "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"},
        "priorityClassName": "system-node-critical",
        "terminationGracePeriodSeconds": 120,
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0}},
        "logJson": false,
        "legacy": "token",
        "legacyAllowCidrs": "10.42.0.0/16",
        "nodeSelector": {},
        "tolerations": [{"operator": "Exists"}, {"key": "dedicated", "operator": "Equal", "value": "storage", "effect": "NoSchedule"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "2Gi"}},
        "image": {"repository": "registry.example/soda-syncer", "tag": "0.1.0", "pullPolicy": "Always"},
        "soda": {"endpoint": "http://soda-apiserver.soda:50040", "authStrategy": "keystone", "tenantId": "tenant-1",
            "keystoneSecret": "soda-keystone", "pollSeconds": 60}
    })
}

#[test]
fn chart_options_change_what_they_say() {
    let over = options();
    let b = chart(&over);
    let x = Expect::from_values(&merged(chart_values(), &over));
    assert_eq!(x.caps, BTreeSet::from(["DAC_READ_SEARCH"]));
    let p = [check_daemonset(&b, &x), check_rbac(&b, false, false)].concat();
    assert!(p.is_empty(), "{}", p.join("\n"));
    let ds = one!(b, DaemonSet);
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let args = container_args(&b);
    assert!(args.contains(&"--allowed-root=/mnt/disks,/opt/local-path-provisioner".to_string()), "{args:?}");
    assert!(args.contains(&"--legacy=token".to_string()) && !args.contains(&"--log-json".to_string()), "{args:?}");
    assert!(args.contains(&"--shutdown-grace-seconds=120".to_string()), "{args:?}");
    assert_eq!(pod.termination_grace_period_seconds, Some(120));
    let rolling = ds.spec.update_strategy.as_ref().and_then(|u| u.rolling_update.clone()).unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::String("10%".into())));
    // A surge, or a grace the flag does not follow, is caught.
    let surge = chart(
        &json!({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}),
    );
    let p = check_daemonset(&surge, &Expect::from_values(&chart_values()));
    assert!(p.iter().any(|p| p.contains("maxSurge 0")), "{p:?}");
    let mut short = chart(&json!({}));
    for o in short.objs.iter_mut() {
        if let Obj::DaemonSet(d) = o {
            d.spec.template.spec.as_mut().unwrap().termination_grace_period_seconds = Some(10);
        }
    }
    let p = check_daemonset(&short, &Expect::from_values(&chart_values()));
    assert!(p.iter().any(|p| p.contains("terminationGracePeriodSeconds")), "{p:?}");
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m.mount_path == "/mnt/disks" && m.mount_propagation.as_deref() == Some("HostToContainer")));
    let secret = one!(b, Secret);
    let data = secret.string_data.clone().unwrap();
    assert_eq!(data.get("secrets.key").map(String::len), Some(64));
    assert_eq!(pod.containers[0].image.as_deref(), Some("registry.example/soda-syncer:0.1.0"));
    // The SODA sync: endpoint and poll as flags, auth in the environment,
    // the keystone credentials from the named Secret.
    assert!(args.contains(&"--soda-endpoint=http://soda-apiserver.soda:50040".to_string()), "{args:?}");
    assert!(args.contains(&"--soda-poll-seconds=60".to_string()), "{args:?}");
    let env = pod.containers[0].env.clone().unwrap_or_default();
    let var = |n: &str| env.iter().find(|e| e.name == n).and_then(|e| e.value.clone());
    assert_eq!(var("OPENSDS_AUTH_STRATEGY").as_deref(), Some("keystone"));
    assert_eq!(var("OPENSDS_TENANT_ID").as_deref(), Some("tenant-1"));
    let from = pod.containers[0].env_from.clone().unwrap_or_default();
    assert_eq!(from.len(), 1);
    assert_eq!(from[0].secret_ref.as_ref().map(|s| s.name.as_str()), Some("soda-keystone"));
    // With consistency and restore, SYS_ADMIN and the write capabilities come back, and AppArmor is unconfined.
    let full = chart(&json!({}));
    let c = &one!(full, DaemonSet).spec.template.spec.as_ref().unwrap().containers[0];
    assert!(!c.args.as_ref().unwrap().iter().any(|a| a.starts_with("--soda")), "no SODA sync by default");
    assert!(c.env_from.is_none() && !c.env.as_ref().unwrap().iter().any(|e| e.name.starts_with("OPENSDS")));
    let x = Expect::from_values(&chart_values());
    assert_eq!(x.caps, BTreeSet::from(["DAC_READ_SEARCH", "CHOWN", "FOWNER", "FSETID", "DAC_OVERRIDE", "SYS_ADMIN"]));
    assert!(x.apparmor_unconfined && !x.privileged && !x.tls);
    let p = check_daemonset(&full, &x);
    assert!(p.is_empty(), "{}", p.join("\n"));
    // A bring-your-own Secret: the chart makes none, the DaemonSet still mounts it by name.
    let byo = chart(&json!({"apiSecret": {"create": false, "name": "my-token"}}));
    assert!(!byo.objs.iter().any(|o| matches!(o, Obj::Secret(_))));
    let pod = one!(byo, DaemonSet).spec.template.spec.clone().unwrap();
    assert!(pod
        .volumes
        .unwrap()
        .iter()
        .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("my-token")));
}

#[test]
fn chart_metadata_and_values_are_all_used() {
    let chart_yaml = yaml_docs(&read(&chart_dir().join("Chart.yaml")), "Chart.yaml").pop().expect("Chart.yaml");
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(chart_yaml["name"], "soda-syncer");
    assert_eq!(chart_yaml["appVersion"], env!("CARGO_PKG_VERSION"), "appVersion is the agent's version");
    assert!(chart_yaml["version"].as_str().is_some_and(|v| v.split('.').count() == 3), "version is semver");
    // Every leaf of values.yaml is read by some template (toYaml of a parent counts).
    let mut leaves = Vec::new();
    fn walk(v: &Value, at: String, out: &mut Vec<String>) {
        match v {
            Value::Object(o) if !o.is_empty() => {
                for (k, x) in o {
                    walk(x, if at.is_empty() { k.clone() } else { format!("{at}.{k}") }, out);
                }
            }
            _ => out.push(at),
        }
    }
    walk(&chart_values(), String::new(), &mut leaves);
    let mut used = render_chart(&json!({})).1;
    used.extend(render_chart(&options()).1);
    used.extend(render_chart(&json!({"maintainer": {"enabled": true}, "appendOnly": true})).1);
    let unused: Vec<&String> =
        leaves.iter().filter(|l| !used.iter().any(|u| *l == u || l.starts_with(&format!("{u}.")))).collect();
    assert!(unused.is_empty(), "values.yaml keys no template reads: {unused:?}");
}

#[test]
fn the_checks_catch_typos_unknown_kinds_and_strays() {
    let ds = plain().docs.into_iter().map(|(_, d)| d).find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
    assert!(to_typed(&ds).is_ok());
    // A misspelt field is dropped by k8s-openapi, and the round trip sees it.
    let mut typo = ds.clone();
    let mount = &mut typo["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0];
    let v = mount.as_object_mut().unwrap().remove("mountPropagation").expect("the first mount is the kubelet root");
    mount["mountPropogation"] = v;
    let e = to_typed(&typo).unwrap_err();
    assert!(e.contains("mountPropogation"), "{e}");
    // A wrong type is named with its path.
    let mut wrong = ds.clone();
    wrong["spec"]["template"]["spec"]["containers"][0]["ports"][0]["hostPort"] = json!("fifty");
    let e = to_typed(&wrong).unwrap_err();
    assert!(e.contains("hostPort"), "{e}");
    // An unknown kind fails.
    let e = to_typed(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})).unwrap_err();
    assert!(e.contains("ConfigMap"), "{e}");
    // YAML 1.1 readings.
    assert_eq!(yaml11_traps("a: on\nmode: 0400\nb: \"on\"\n- off\nc: 256 # 0400\n", "t").len(), 3);
    // The template checker refuses what it does not implement and values that do not exist.
    let ctx = tpl::Ctx {
        values: json!({"a": {"b": "x", "on": true, "list": [1]}}),
        release_name: "r".into(),
        release_namespace: "n".into(),
        used: Default::default(),
    };
    assert_eq!(
        ctx.render("k: {{ .Values.a.b | quote }}\n{{- if .Values.a.on }}\nm: {{ .Release.Name }}\n{{- end }}").unwrap(),
        "k: \"x\"\nm: r"
    );
    assert_eq!(ctx.render("l:\n  {{- toYaml .Values.a.list | nindent 2 }}").unwrap(), "l:\n  - 1");
    for bad in [
        "{{ .Values.a.c }}",
        "{{ default \"x\" .Values.a.b }}",
        "{{ .Values.a.b | upper }}",
        "{{ if .Values.a.on }}",
        "{{ end }}",
        "{{ .Values.a.list }}",
        "{{ .Chart.Name }}",
    ] {
        assert!(ctx.render(bad).is_err(), "{bad} must be refused");
    }
}

#[test]
fn dockerfile_builds_and_runs_the_agent_binary() {
    let text = read(&repo().join("Dockerfile"));
    // Instructions, with continuation lines joined and comments dropped.
    let joined =
        text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n").replace("\\\n", " ");
    let instr: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (k.to_ascii_uppercase(), v.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .collect();
    let froms: Vec<&str> = instr.iter().filter(|(k, _)| k == "FROM").map(|(_, v)| v.as_str()).collect();
    // Debian 13 at run time (restic 0.18); the build stage's glibc must not
    // be newer than the runtime's, or the binary does not start there.
    assert_eq!(froms, ["rust:1-bookworm AS build", "debian:trixie-slim"], "a build stage and a slim runtime");
    let bin = Path::new(env!("CARGO_BIN_EXE_soda-syncer")).file_name().unwrap().to_string_lossy().into_owned();
    let pkg = env!("CARGO_PKG_NAME");
    let runs: Vec<&str> = instr.iter().filter(|(k, _)| k == "RUN").map(|(_, v)| v.as_str()).collect();
    assert!(runs.iter().any(|r| r.contains(&format!("cargo build --release --locked -p {pkg}"))), "{runs:?}");
    let apt = runs.iter().find(|r| r.contains("apt-get install")).expect("packages from Debian");
    let packages: Vec<&str> = apt
        .split("--no-install-recommends")
        .nth(1)
        .and_then(|rest| rest.split("&&").next())
        .expect("apt-get install -y --no-install-recommends PACKAGES &&")
        .split_whitespace()
        .collect();
    for pkg in ["restic", "ca-certificates", "btrfs-progs", "xfsprogs", "util-linux", "mount"] {
        assert!(packages.contains(&pkg), "the image installs {pkg}: {packages:?}");
    }
    // scripts/image builds the same image without Docker: the same packages.
    let script = read(&repo().join("scripts/image"));
    let listed = script
        .lines()
        .find_map(|l| l.strip_prefix("PACKAGES=(").and_then(|r| r.strip_suffix(')')))
        .expect("PACKAGES=(...) in scripts/image");
    assert_eq!(
        listed.split_whitespace().collect::<Vec<_>>(),
        packages,
        "scripts/image and the Dockerfile install the same packages"
    );
    let copy = instr
        .iter()
        .find(|(k, v)| k == "COPY" && v.starts_with("--from=build"))
        .map(|(_, v)| v.as_str())
        .expect("COPY --from=build");
    let parts: Vec<&str> = copy.split_whitespace().collect();
    assert!(parts[1].ends_with(&format!("/target/release/{bin}")), "the build stage's binary is {bin}: {copy}");
    let installed = parts[2];
    let entry = instr.iter().find(|(k, _)| k == "ENTRYPOINT").map(|(_, v)| v.as_str()).expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(entry).expect("ENTRYPOINT in exec form (a JSON list)");
    assert_eq!(entry, [installed.to_string(), "serve".into()], "the entrypoint runs the copied binary's serve");
    let ignore = read(&repo().join(".dockerignore"));
    assert!(ignore.lines().any(|l| l.trim().trim_end_matches('/') == "target"), "the build context leaves target/ out");
    for kept in ["crates", "Cargo.toml", "Cargo.lock"] {
        assert!(!ignore.lines().any(|l| l.trim().trim_end_matches('/') == kept), "{kept} is needed to build");
    }
}

/// The maintainer (README, "Immutable backups"): off by default; on, a
/// Deployment of one in its own namespace, the only pod that mounts its
/// Secret, a Role for the Leases in the agents' namespace, and arguments the
/// real binary accepts. appendOnly gives the agents --append-only.
#[test]
fn the_chart_s_maintainer_runs_alone_with_the_only_mount_of_the_delete_credentials() {
    let (default_text, _) = render_chart(&json!({}));
    assert!(!default_text.contains("kind: Deployment"), "no maintainer unless enabled");
    let (text, _) = render_chart(&json!({"maintainer": {"enabled": true}, "appendOnly": true}));
    let docs = yaml_docs(&text, "rendered chart");
    let objs: Vec<Obj> = docs.iter().map(|d| to_typed(d).unwrap_or_else(|e| panic!("{e}\n{d}"))).collect();
    let deployment = objs
        .iter()
        .find_map(|o| if let Obj::Deployment(d) = o { Some(d) } else { None })
        .expect("a maintainer Deployment");
    assert_eq!(deployment.metadata.namespace.as_deref(), Some("soda-syncer-maintainer"));
    let spec = &deployment.spec;
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.strategy.as_ref().and_then(|s| s.type_.as_deref()), Some("Recreate"));
    let pod = spec.template.spec.as_ref().unwrap();
    let secret_of = |p: &PodSpec| -> Vec<String> {
        p.volumes.iter().flatten().filter_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone())).collect()
    };
    assert_eq!(secret_of(pod), ["soda-syncer-maintainer"]);
    let ds = objs.iter().find_map(|o| if let Obj::DaemonSet(d) = o { Some(d) } else { None }).unwrap();
    let ds_pod = ds.spec.template.spec.as_ref().unwrap();
    assert!(!secret_of(ds_pod).contains(&"soda-syncer-maintainer".to_string()), "the nodes never mount it");
    assert!(ds_pod.containers[0].args.iter().flatten().any(|a| a == "--append-only"));
    // Its Lease rights, in the agents' namespace, and nothing else.
    let role = objs
        .iter()
        .find_map(|o| match o {
            Obj::Role(r) if r.metadata.name.as_deref() == Some("soda-syncer-maintainer") => Some(r),
            _ => None,
        })
        .expect("the maintainer's Role");
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    let rules = role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].resources.as_deref(), Some(&["leases".to_string()][..]));
    // The real binary takes these arguments (and stops at the missing config file).
    let c = &pod.containers[0];
    assert_eq!(c.command.as_deref(), Some(&["/usr/local/bin/soda-syncer".to_string(), "maintain".to_string()][..]));
    let tmp = tempfile::tempdir().unwrap();
    let args: Vec<String> = c
        .args
        .iter()
        .flatten()
        .map(|a| match a.split_once('=') {
            Some((f @ ("--config" | "--state-dir"), v)) => {
                format!("{f}={}", tmp.path().join(v.trim_start_matches('/')).display())
            }
            _ => a.clone(),
        })
        .collect();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_soda-syncer")).arg("maintain").args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read the maintainer's configuration"), "{err}");
}

//! kube-rs 5 against the Kubernetes API server stand-in: the watcher with
//! a field selector (list, then watch with bookmarks; DELETED for an object
//! that leaves the selector), a relist after an in-stream 410, resuming
//! after an API server restart, optimistic concurrency (409) on patch and
//! replace, the events Recorder, Leases, pagination, server-side apply,
//! and raw wire checks of the error statuses.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config, Resource, ResourceExt};
use serde_json::{json, Value};
use soda_syncer_standin::kube::{KubeStandin, KubeStandinOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client built from the stand-in's own kubeconfig (so its token is sent).
async fn client(standin: &KubeStandin) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config");
    standin.write_kubeconfig(&path).unwrap();
    let kc = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
    Client::try_from(config).unwrap()
}

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}})
}

fn pvc(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": "default"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Send one raw HTTP/1.1 request; (status, body text). Chunked bodies are
/// left as they came (the watch tests only look for lines in them).
async fn raw_text(standin: &KubeStandin, method: &str, path: &str, content_type: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", standin.port())).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    (status, out.split_once("\r\n\r\n").unwrap().1.to_string())
}

async fn raw(standin: &KubeStandin, method: &str, path: &str, content_type: &str, body: &str) -> (u16, Value) {
    let (status, text) = raw_text(standin, method, path, content_type, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test]
async fn watcher_with_a_node_selector_follows_its_pods_through_expiry_and_restart() {
    let standin = KubeStandin::start_with(KubeStandinOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    standin.apply(pod("p1", "n1")).unwrap();
    standin.apply(pod("p2", "n2")).unwrap();
    let pods: Api<Pod> = Api::all(client(&standin).await);
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = log.clone();
    let task = tokio::spawn(async move {
        let config = watcher::Config::default().fields("spec.nodeName=n1");
        let mut stream = std::pin::pin!(watcher(pods, config).default_backoff());
        while let Some(ev) = stream.next().await {
            let line = match ev {
                Ok(watcher::Event::Init) => "Init".to_string(),
                Ok(watcher::Event::InitApply(p)) => format!("InitApply {}", p.name_any()),
                Ok(watcher::Event::InitDone) => "InitDone".to_string(),
                Ok(watcher::Event::Apply(p)) => format!("Apply {} {}", p.name_any(), p.labels().len()),
                Ok(watcher::Event::Delete(p)) => format!("Delete {}", p.name_any()),
                Err(e) => format!("Error {e}"),
            };
            sink.lock().unwrap().push(line);
        }
    });
    let has = |line: &str| log.lock().unwrap().iter().any(|l| l == line);
    let count = |line: &str| log.lock().unwrap().iter().filter(|l| *l == line).count();
    eventually("the initial list", || has("InitDone")).await;
    assert!(has("InitApply p1") && !has("InitApply p2"), "{:?}", log.lock().unwrap());

    standin.apply(pod("p3", "n1")).unwrap();
    standin.apply(pod("p4", "n2")).unwrap();
    let mut p1 = pod("p1", "n1");
    p1["metadata"]["labels"] = json!({"changed": "yes"});
    standin.apply(p1).unwrap();
    eventually("p3 added and p1 modified", || has("Apply p3 0") && has("Apply p1 1")).await;
    standin.apply(pod("p3", "n2")).unwrap(); // moved away: leaves the selector
    standin.delete("v1", "pods", Some("default"), "p1").unwrap();
    eventually("p3 gone from n1, p1 deleted", || has("Delete p3") && has("Delete p1")).await;
    // Bookmarks flow (every 200 ms) without disturbing the watcher.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!log.lock().unwrap().iter().any(|l| l.contains("p4") || l.contains("p2") || l.starts_with("Error")));
    let watches: Vec<_> = standin.requests().into_iter().filter(|r| r.param("watch").is_some()).collect();
    assert_eq!(watches.len(), 1, "one watch so far: {watches:?}");
    assert_eq!(watches[0].param("allowWatchBookmarks").as_deref(), Some("true"));
    assert_eq!(watches[0].param("fieldSelector").as_deref(), Some("spec.nodeName=n1"));

    // Compaction: the in-stream 410 makes the watcher relist.
    standin.expire_watches();
    standin.apply(pod("p5", "n1")).unwrap();
    eventually("a relist after 410", || count("InitDone") == 2).await;
    eventually("p5 seen", || has("InitApply p5") || has("Apply p5 0")).await;

    // A restart cuts the watch; the watcher comes back from its last
    // resourceVersion without a relist and sees what happened meanwhile.
    let watch_count = || standin.requests().iter().filter(|r| r.param("watch").is_some()).count();
    let before = watch_count();
    standin.stop().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    standin.apply(pod("p6", "n1")).unwrap();
    standin.resume().await;
    eventually("p6 after the restart", || has("Apply p6 0")).await;
    assert!(watch_count() > before, "the restart cut the open watch and a new one came");
    standin.restart().await;
    standin.apply(pod("p7", "n1")).unwrap();
    eventually("p7 after the second restart", || has("Apply p7 0")).await;
    let before = watch_count();
    standin.close_watches();
    standin.apply(pod("p8", "n1")).unwrap();
    eventually("p8 after the watches were closed", || has("Apply p8 0")).await;
    assert!(watch_count() > before, "a closed watch is opened again");
    let last_watch = standin.requests().into_iter().rev().find(|r| r.param("watch").is_some()).unwrap();
    assert!(last_watch.param("resourceVersion").is_some_and(|rv| rv != "0"), "{last_watch:?}");
    assert_eq!(count("InitDone"), 2, "no relist after a restart or a close: {:?}", log.lock().unwrap());
    task.abort();
}

#[tokio::test]
async fn merge_patch_and_replace_with_a_stale_resource_version_conflict() {
    let standin = KubeStandin::start().await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client(&standin).await, "default");
    let created = pvcs.create(&PostParams::default(), &serde_json::from_value(pvc("data")).unwrap()).await.unwrap();
    let rv0 = created.resource_version().unwrap();
    assert!(created.uid().is_some() && created.creation_timestamp().is_some());

    let patch = json!({"metadata": {"annotations": {"a": "1"}, "resourceVersion": rv0}});
    let patched = pvcs.patch("data", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    assert_eq!(patched.annotations()["a"], "1");
    let err = pvcs.patch("data", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap_err();
    let kube::Error::Api(status) = err else { panic!("{err:?}") };
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    let err = pvcs.replace("data", &PostParams::default(), &created).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err:?}");
    let err = pvcs.create(&PostParams::default(), &created).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"), "{err:?}");

    // Status is a subresource: the main resource ignores it, /status takes it.
    let status = json!({"status": {"phase": "Bound"}});
    let p = pvcs.patch("data", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert!(p.status.is_none_or(|s| s.phase.is_none()));
    let p = pvcs.patch_status("data", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Bound"));

    // JSON patch and server-side apply (a merge here).
    let ops = json!([{"op": "add", "path": "/metadata/labels", "value": {"x": "1"}}]);
    let ops = Patch::Json::<()>(serde_json::from_value(ops).unwrap());
    assert_eq!(pvcs.patch("data", &PatchParams::default(), &ops).await.unwrap().labels()["x"], "1");
    let applied = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "fresh", "labels": {"y": "2"}}});
    let ssa = PatchParams::apply("standin-test").force();
    let p = pvcs.patch("fresh", &ssa, &Patch::Apply(&applied)).await.unwrap();
    assert_eq!(p.labels()["y"], "2");
    assert_eq!(
        standin.get("v1", "PersistentVolumeClaim", Some("default"), "fresh").unwrap()["metadata"]["labels"]["y"],
        "2"
    );
}

#[tokio::test]
async fn recorder_publishes_an_events_k8s_io_event_that_reads_back_and_folds_repeats() {
    let standin = KubeStandin::start().await;
    let client = client(&standin).await;
    let pvc: PersistentVolumeClaim = serde_json::from_value(standin.apply(pvc("data")).unwrap()).unwrap();
    let reporter = Reporter { controller: "soda-syncer".into(), instance: Some("node-1".into()) };
    let recorder = Recorder::new(client.clone(), reporter);
    let ev = Event {
        type_: EventType::Warning,
        reason: "BackupFailed".into(),
        note: Some("restic exited 1".into()),
        action: "Backup".into(),
        secondary: None,
    };
    recorder.publish(&ev, &pvc.object_ref(&())).await.unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    let e = &list.items[0];
    assert_eq!(e.reason.as_deref(), Some("BackupFailed"));
    assert_eq!(e.regarding.as_ref().unwrap().name.as_deref(), Some("data"));
    recorder.publish(&ev, &pvc.object_ref(&())).await.unwrap();
    let again = events.get(&e.name_any()).await.unwrap();
    assert_eq!(again.series.unwrap().count, 2);
    let reqs = standin.requests();
    assert!(reqs.iter().any(|r| r.method == "POST" && r.path == "/apis/events.k8s.io/v1/namespaces/default/events"));
    assert!(reqs
        .iter()
        .any(|r| r.method == "PATCH" && r.content_type.as_deref() == Some("application/merge-patch+json")));
}

#[tokio::test]
async fn lease_create_get_and_replace_with_a_stale_copy_conflicts() {
    let standin =
        KubeStandin::start_with(KubeStandinOptions { require_token: Some("s3cret".into()), ..Default::default() })
            .await;
    let leases: Api<Lease> = Api::namespaced(client(&standin).await, "kube-node-lease");
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "soda-syncer-n1"},
        "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}))
    .unwrap();
    let created = leases.create(&PostParams::default(), &lease).await.unwrap();
    let mut mine = leases.get("soda-syncer-n1").await.unwrap();
    assert_eq!(mine.resource_version(), created.resource_version());
    mine.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let replaced = leases.replace("soda-syncer-n1", &PostParams::default(), &mine).await.unwrap();
    assert_ne!(replaced.resource_version(), created.resource_version());
    let err = leases.replace("soda-syncer-n1", &PostParams::default(), &created).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"), "{err:?}");
    let stored = standin.get("coordination.k8s.io/v1", "Lease", Some("kube-node-lease"), "soda-syncer-n1").unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "b");

    // The token is required: a request without it is 401.
    let (code, body) = raw(&standin, "GET", "/api/v1/pods", "application/json", "").await;
    assert_eq!((code, body["reason"].as_str()), (401, Some("Unauthorized")));
}

#[tokio::test]
async fn paginated_lists_and_label_selectors_and_streaming_lists() {
    let standin = KubeStandin::start().await;
    let n = standin.apply_all((0..25).map(|i| {
        let mut p = pvc(&format!("c{i:02}"));
        p["metadata"]["labels"] = json!({"parity": if i % 2 == 0 { "even" } else { "odd" }});
        p
    }));
    assert_eq!(n.unwrap(), 25);
    let client = client(&standin).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let (mut names, mut token, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let mut lp = ListParams::default().limit(10);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = pvcs.list(&lp).await.unwrap();
        pages += 1;
        names.extend(page.items.iter().map(|p| p.name_any()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
        if token.is_none() {
            break;
        }
    }
    assert_eq!((pages, names.len()), (3, 25));
    assert_eq!(names, (0..25).map(|i| format!("c{i:02}")).collect::<Vec<_>>());
    let odd = pvcs.list(&ListParams::default().labels("parity in (odd),!missing")).await.unwrap();
    assert_eq!(odd.items.len(), 12);

    // sendInitialEvents: the initial events end with the marked bookmark.
    let config = watcher::Config::default().labels("parity=even").streaming_lists();
    let mut stream = std::pin::pin!(watcher(pvcs, config).default_backoff());
    let mut initial = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await.unwrap().unwrap().unwrap() {
            watcher::Event::InitApply(_) => initial += 1,
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    assert_eq!(initial, 13);
    let first_watch = standin.requests().into_iter().find(|r| r.param("watch").is_some()).unwrap();
    assert_eq!(first_watch.param("sendInitialEvents").as_deref(), Some("true"));
}

#[tokio::test]
async fn wire_errors_are_status_bodies_with_the_matching_code() {
    let standin = KubeStandin::start().await;
    standin.apply(pvc("data")).unwrap();
    let base = "/api/v1/namespaces/default/persistentvolumeclaims";
    let cases = [
        ("GET", "/api/v1/widgets", "application/json", "", 404, "NotFound"),
        ("GET", &format!("{base}/missing") as &str, "application/json", "", 404, "NotFound"),
        ("POST", base, "application/json", "{not json", 400, "BadRequest"),
        ("POST", base, "application/json", &pvc("data").to_string(), 409, "AlreadyExists"),
        ("PATCH", &format!("{base}/data"), "text/plain", "{}", 415, "UnsupportedMediaType"),
        ("GET", "/api/v1/pods?&fieldSelector=spec.bogus%3Dx", "application/json", "", 400, "BadRequest"),
    ];
    for (method, path, ct, body, code, reason) in cases {
        let (got, status) = raw(&standin, method, path, ct, body).await;
        assert_eq!((got, status["reason"].as_str()), (code, Some(reason)), "{method} {path}: {status}");
        assert_eq!((status["kind"].as_str(), status["code"].as_u64()), (Some("Status"), Some(code as u64)));
    }
    standin.fail_next(1, 503);
    assert_eq!(raw(&standin, "GET", base, "application/json", "").await.0, 503);
    assert_eq!(raw(&standin, "GET", "/api/v1/pods?&limit=1", "application/json", "").await.0, 200);

    // A watch honours timeoutSeconds; one from a compacted resourceVersion
    // gets the 410 inside a 200 stream.
    let started = std::time::Instant::now();
    let rv = standin.resource_version();
    let (code, text) =
        raw_text(&standin, "GET", &format!("{base}?watch=1&timeoutSeconds=1&resourceVersion={rv}"), "", "").await;
    assert_eq!(code, 200);
    assert!((1.0..5.0).contains(&started.elapsed().as_secs_f64()), "{:?} {text}", started.elapsed());
    standin.expire_watches();
    let (code, text) = raw_text(&standin, "GET", &format!("{base}?watch=1&resourceVersion=1"), "", "").await;
    assert_eq!(code, 200);
    assert!(text.contains(r#"{"type":"ERROR","object":{"#) && text.contains(r#""code":410"#), "{text}");

    let (code, doc) = raw(&standin, "GET", "/apis/storage.k8s.io/v1", "application/json", "").await;
    assert_eq!(code, 200);
    let sc = doc["resources"].as_array().unwrap().iter().find(|r| r["name"] == "storageclasses").unwrap();
    assert_eq!((sc["namespaced"].as_bool(), &sc["shortNames"]), (Some(false), &json!(["sc"])));
}

/// `pods/exec` over the WebSocket channel protocol, as kube-rs speaks it:
/// stdout and stderr, the exit status (Success, NonZeroExitCode with the
/// code), the record of every exec, 404 for an unknown pod or container,
/// and no local process unless the test enables it.
#[tokio::test]
async fn kube_rs_exec_speaks_the_channel_protocol() {
    use kube::api::AttachParams;
    let standin = KubeStandin::start().await;
    let mut p = pod("app", "node-a");
    p["spec"]["containers"] = json!([{"name": "app", "image": "busybox"}, {"name": "side", "image": "busybox"}]);
    standin.apply(p).unwrap();
    let client = client(&standin).await;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let params = |c: &str| AttachParams::default().container(c).stdin(false).stdout(true).stderr(true);

    async fn run(
        pods: &Api<Pod>,
        name: &str,
        argv: &[&str],
        ap: &AttachParams,
    ) -> kube::Result<(String, String, k8s_openapi::apimachinery::pkg::apis::meta::v1::Status)> {
        let mut a = pods.exec(name, argv.iter().map(|s| s.to_string()).collect::<Vec<_>>(), ap).await?;
        let status = a.take_status().unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        let (mut so, mut se) = (a.stdout().unwrap(), a.stderr().unwrap());
        let _ = tokio::join!(so.read_to_string(&mut out), se.read_to_string(&mut err));
        let status = status.await.expect("a status");
        a.join().await.unwrap();
        Ok((out, err, status))
    }

    // Off by default: nothing runs on the host.
    let (_, err, status) = run(&pods, "app", &["/bin/echo", "hi"], &params("side")).await.unwrap();
    assert_eq!(status.status.as_deref(), Some("Failure"));
    assert!(err.contains("runs no containers"), "{err}");

    standin.exec_runs_locally(true);
    let (out, _, status) =
        run(&pods, "app", &["/bin/sh", "-c", "echo out; echo err >&2"], &params("app")).await.unwrap();
    assert_eq!(out, "out\n");
    assert_eq!(status.status.as_deref(), Some("Success"));
    let (_, err, status) = run(&pods, "app", &["/bin/sh", "-c", "echo bad >&2; exit 3"], &params("app")).await.unwrap();
    assert_eq!(err, "bad\n");
    assert_eq!(status.status.as_deref(), Some("Failure"));
    assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
    let cause = &status.details.unwrap().causes.unwrap()[0];
    assert_eq!((cause.reason.as_deref(), cause.message.as_deref()), (Some("ExitCode"), Some("3")));

    // Unknown pod or container: a 404 Status, no upgrade.
    for (name, c) in [("nope", "app"), ("app", "nope")] {
        match run(&pods, name, &["/bin/true"], &params(c)).await {
            Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"), "{s:?}"),
            other => panic!("expected a refused upgrade for {name}/{c}, got {:?}", other.map(|r| r.2)),
        }
    }
    let execs = standin.execs();
    assert_eq!(execs.len(), 3, "{execs:?}");
    assert_eq!(execs[0].container, "side");
    assert_eq!(execs[1].command, vec!["/bin/sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(
        (execs[2].namespace.as_str(), execs[2].pod.as_str(), execs[2].container.as_str()),
        ("default", "app", "app")
    );
}

//! The image: `scripts/image` builds it from Debian 13 packages only (no
//! registry can be reached here), and podman runs it the way the kubelet
//! runs the chart's DaemonSet: the agent container's command, args, env,
//! securityContext, volume mounts and memory limit as the chart renders
//! them, hostPath volumes as temporary directories. The agent in the
//! container becomes ready against the Kubernetes API server stand-in,
//! backs up a volume mounted under the kubelet root after it started (the
//! mount reaches it through the HostToContainer propagation), with the
//! image's own restic (Debian 13's 0.18; the host's is Debian 12's 0.14),
//! restores it byte for byte with owners and modes (the capabilities the
//! chart grants), and stops cleanly on SIGTERM.
//!
//! podman runs with `--runtime runc --cgroup-manager cgroupfs`: crun fails
//! on these machines' hybrid cgroups. The test is skipped, saying why, only
//! where podman cannot run (not root, or podman, runc or mmdebstrap missing:
//! scripts/install-deps installs them).

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};
use serde_json::{json, Value};
use soda_syncer_standin::kube::KubeStandin;
use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::deploy::rendered_daemonset;
use crate::kube::eventually;
use crate::restore::{build_tree, snapshot_tree};
use crate::support::{count_state, restic, AgentProc, BindMount, BIN};

/// podman's global flags on these machines.
const PODMAN: &[&str] = &["--runtime", "runc", "--cgroup-manager", "cgroupfs"];
/// Root filesystems of earlier runs, keyed by their package list (scripts/image).
const ROOTFS_CACHE: &str = "/var/cache/soda-syncer-test/image";
const NODE: &str = "image-test-node";
/// The pod's name: the downward API's metadata.name, and its hostname.
const POD: &str = "soda-syncer-image-test";
/// The Debian 13 (trixie) restic series.
const DEBIAN_13_RESTIC: &str = "0.18.";

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(PODMAN).stdin(Stdio::null());
    c
}

/// Run podman; its stdout, or a panic with what it said.
fn podman_ok(args: &[&str]) -> String {
    let out = podman().args(args).output().expect("run podman");
    assert!(out.status.success(), "podman {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Why podman cannot run a container here, if it cannot.
fn why_podman_cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root: podman's storage and mmdebstrap need root here".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in ["podman", "runc", "mmdebstrap"] {
        if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
            return Some(format!(
                "{tool} is not installed (scripts/install-deps installs podman, runc and mmdebstrap)"
            ));
        }
    }
    match podman().args(["info", "--format", "{{.Host.OCIRuntime.Name}}"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("podman info fails: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("podman does not start: {e}")),
    }
}

/// An image this test imported: removed on drop, also when the test fails.
struct ImageGuard(String);
impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = podman().args(["rmi", "--force", "--ignore", &self.0]).output();
    }
}

/// A container this test started: removed on drop, also when the test fails.
struct ContainerGuard(String);
impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "--force", "--ignore", "--time", "0", &self.0]).output();
    }
}

/// A Kubernetes quantity of bytes (`512Mi`, `2Gi`, `1000000`) as bytes.
fn bytes(q: &str) -> u64 {
    let (n, unit) = q.find(|c: char| !c.is_ascii_digit()).map_or((q, ""), |i| q.split_at(i));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("memory quantity {q:?}: only whole numbers are handled"));
    let mult = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => panic!("memory quantity {q:?}: unit {unit:?} is not handled by this test"),
    };
    n * mult
}

/// The keys of a serialized object, to refuse fields this translation does
/// not know: a field added to the chart must be translated here (or said to
/// be irrelevant), not silently dropped.
fn keys_within(what: &str, v: &Value, known: &[&str]) {
    for k in v.as_object().map(|o| o.keys().collect::<Vec<_>>()).unwrap_or_default() {
        assert!(
            known.contains(&k.as_str()),
            "{what}.{k} is set, and this test does not know how to run it with podman"
        );
    }
}

/// Where each of the pod's volumes is on this machine.
struct HostDirs {
    /// volume name -> host directory
    by_volume: BTreeMap<String, PathBuf>,
}

impl HostDirs {
    /// Temporary directories for the pod's volumes under `root`: a hostPath
    /// volume's path moved under it, a Secret's files written with its
    /// mode, an emptyDir a new directory.
    fn make(root: &Path, pod: &PodSpec, container: &Container, secret_files: &BTreeMap<String, String>) -> HostDirs {
        let mut by_volume = BTreeMap::new();
        for v in pod.volumes.iter().flatten() {
            let Volume { name, host_path, secret, empty_dir, .. } = v;
            let spec = serde_json::to_value(v).expect("a volume");
            keys_within(&format!("volume {name}"), &spec, &["name", "hostPath", "secret", "emptyDir"]);
            let dir = if let Some(h) = host_path {
                root.join("host").join(h.path.trim_start_matches('/'))
            } else if let Some(s) = secret {
                keys_within(&format!("volume {name}.secret"), &spec["secret"], &["secretName", "defaultMode"]);
                let dir = root.join("secret").join(name);
                let mount = container.volume_mounts.iter().flatten().find(|m| &m.name == name);
                let mount = mount.unwrap_or_else(|| panic!("the Secret volume {name} is not mounted"));
                std::fs::create_dir_all(&dir).unwrap();
                for (path, content) in secret_files {
                    if let Some(file) = path.strip_prefix(&format!("{}/", mount.mount_path)) {
                        let p = dir.join(file);
                        std::fs::write(&p, content).unwrap();
                        let mode = s.default_mode.unwrap_or(0o644) as u32;
                        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                    }
                }
                dir
            } else if let Some(e) = empty_dir {
                assert!(e.medium.as_deref().unwrap_or_default().is_empty(), "emptyDir medium {:?}", e.medium);
                root.join("empty").join(name)
            } else {
                unreachable!("checked above")
            };
            std::fs::create_dir_all(&dir).unwrap();
            by_volume.insert(name.clone(), dir);
        }
        HostDirs { by_volume }
    }
}

/// What the kubelet would fill in from the downward API (the env's
/// valueFrom.fieldRef), as the literal values of this one pod.
fn downward_api(field: &str) -> String {
    match field {
        "spec.nodeName" => NODE.into(),
        "metadata.name" => POD.into(),
        "metadata.namespace" => "soda-syncer".into(),
        other => panic!("env from the downward API field {other}: add its value for this test's pod"),
    }
}

/// `podman run` flags for the pod's one container, from its spec: the
/// entrypoint, env, securityContext (pod and container), volume mounts and
/// memory limit. Networking is not here (the caller's), and neither are
/// ports or probes: with the host's network the agent's port is on the host
/// already, and the test polls the readiness path itself.
fn podman_flags(pod: &PodSpec, c: &Container, dirs: &HostDirs) -> Vec<String> {
    let mut f: Vec<String> = Vec::new();
    let cv = serde_json::to_value(c).expect("container");
    keys_within(
        "container",
        &cv,
        &[
            "name",
            "image",
            "imagePullPolicy",
            "command",
            "args",
            "env",
            "ports",
            "livenessProbe",
            "readinessProbe",
            "resources",
            "securityContext",
            "volumeMounts",
        ],
    );
    if let Some(cmd) = &c.command {
        f.push(format!("--entrypoint={}", serde_json::to_string(cmd).unwrap()));
    }
    // The image is local: nothing may be pulled (there is no registry).
    f.push("--pull=never".into());
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), None) => v.clone(),
            (None, Some(from)) => {
                let field =
                    from.field_ref.as_ref().unwrap_or_else(|| panic!("env {}: only fieldRef is handled", e.name));
                downward_api(&field.field_path)
            }
            _ => panic!("env {}: a value or a valueFrom", e.name),
        };
        f.push(format!("--env={}={}", e.name, value));
    }
    // Security: the pod's context, then the container's (which wins).
    let psc = serde_json::to_value(pod.security_context.clone().unwrap_or_default()).unwrap();
    keys_within("pod securityContext", &psc, &["runAsUser", "runAsGroup", "seccompProfile"]);
    let sc = c.security_context.clone().unwrap_or_default();
    keys_within(
        "securityContext",
        &serde_json::to_value(&sc).unwrap(),
        &[
            "readOnlyRootFilesystem",
            "appArmorProfile",
            "capabilities",
            "privileged",
            "runAsUser",
            "runAsGroup",
            "allowPrivilegeEscalation",
            "seccompProfile",
        ],
    );
    let pod_sc = pod.security_context.clone().unwrap_or_default();
    let user = sc.run_as_user.or(pod_sc.run_as_user);
    let group = sc.run_as_group.or(pod_sc.run_as_group);
    if let Some(u) = user {
        f.push(format!("--user={u}:{}", group.unwrap_or(0)));
    }
    for profile in [sc.seccomp_profile.as_ref(), pod_sc.seccomp_profile.as_ref()].into_iter().flatten().take(1) {
        match profile.type_.as_str() {
            // podman's default profile, like containerd's, is Docker's.
            "RuntimeDefault" => {}
            "Unconfined" => f.push("--security-opt=seccomp=unconfined".into()),
            other => panic!("seccompProfile {other} is not handled"),
        }
    }
    if let Some(a) = &sc.app_armor_profile {
        match a.type_.as_str() {
            "RuntimeDefault" => {}
            "Unconfined" => f.push("--security-opt=apparmor=unconfined".into()),
            other => panic!("appArmorProfile {other} is not handled"),
        }
    }
    if sc.privileged == Some(true) {
        f.push("--privileged".into());
    }
    if sc.allow_privilege_escalation == Some(false) {
        f.push("--security-opt=no-new-privileges".into());
    }
    if sc.read_only_root_filesystem == Some(true) {
        // The kubelet adds no tmpfs of its own, podman would on /tmp, /run, /var/tmp.
        f.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if let Some(caps) = &sc.capabilities {
        for d in caps.drop.iter().flatten() {
            f.push(format!("--cap-drop={d}"));
        }
        for a in caps.add.iter().flatten() {
            f.push(format!("--cap-add={a}"));
        }
    }
    // Volumes.
    for m in c.volume_mounts.iter().flatten() {
        let mv = serde_json::to_value(m).unwrap();
        keys_within(&format!("volumeMount {}", m.name), &mv, &["name", "mountPath", "readOnly", "mountPropagation"]);
        let src = &dirs.by_volume[&m.name];
        let mut spec = format!("type=bind,source={},destination={}", src.display(), m.mount_path);
        if m.read_only == Some(true) {
            spec.push_str(",ro=true");
        }
        match m.mount_propagation.as_deref() {
            None | Some("None") => {}
            Some("HostToContainer") => spec.push_str(",bind-propagation=rslave"),
            Some("Bidirectional") => spec.push_str(",bind-propagation=rshared"),
            Some(other) => panic!("mountPropagation {other}"),
        }
        f.push(format!("--mount={spec}"));
    }
    // Resources: the memory limit (the cgroup the agent and restic share);
    // requests only inform the scheduler.
    if let Some(limits) = c.resources.as_ref().and_then(|r| r.limits.as_ref()) {
        for (k, q) in limits {
            match k.as_str() {
                "memory" => f.push(format!("--memory={}", bytes(&q.0))),
                "cpu" => f.push(format!("--cpus={}", q.0)),
                other => panic!("resources.limits.{other} is not handled"),
            }
        }
    }
    f
}

/// `--flag=value` of an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

/// Make `dir` a shared mount point, as the kubelet makes its root directory:
/// mounts made under it afterwards propagate into containers that mount it
/// with HostToContainer (rslave) propagation.
fn shared_mount(dir: &Path) -> BindMount {
    let m = BindMount::new(dir, dir).expect("bind the kubelet root onto itself");
    let st = Command::new("mount").arg("--make-shared").arg(dir).status().expect("mount --make-shared");
    assert!(st.success(), "mount --make-shared {}", dir.display());
    m
}

/// The JSON log lines (--log-json) with this message.
fn log_lines(log: &str, message: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

fn the_dockerfile_entrypoint() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Dockerfile")).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("ENTRYPOINT ")).expect("the Dockerfile's ENTRYPOINT");
    serde_json::from_str(line).expect("ENTRYPOINT in exec form")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_runs_the_daemonset_container_and_backs_up_and_restores_a_volume_with_its_own_restic() {
    if let Some(why) = why_podman_cannot_run() {
        eprintln!("skipped: podman cannot run containers here: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let unique = format!("{}-{}", std::process::id(), now_nanos() % 1_000_000_000);
    let token = format!("image-test-token-{unique}");

    // The API server, with this node and the agent's namespace.
    let api = KubeStandin::start().await;
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "soda-syncer"}}),
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}}}),
    ] {
        api.apply(obj).unwrap();
    }
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();

    // The chart's DaemonSet, naming the image built below and with an API token.
    let (ds, secret_files): (DaemonSet, _) = rendered_daemonset(&json!({
        "image": {"repository": "localhost/soda-syncer-image-test", "tag": unique},
        "apiSecret": {"token": token},
    }));
    let template = ds.spec.template;
    let pod = template.spec.unwrap();
    let [container]: [Container; 1] = pod.containers.clone().try_into().expect("one container");
    let image = container.image.clone().expect("the container's image");
    assert_eq!(image, format!("localhost/soda-syncer-image-test:{unique}"));

    // Build the image from Debian packages and this test run's binary.
    let _image = ImageGuard(image.clone());
    let started = Instant::now();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/image");
    let out = Command::new(&script)
        .args(["--binary", BIN, "--tag", &image, "--rootfs-cache", ROOTFS_CACHE])
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/image");
    let build_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "scripts/image failed ({}):\n{build_log}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), image, "scripts/image prints the image it built");
    let build_secs = started.elapsed().as_secs_f64();
    let config: Value = serde_json::from_str(&podman_ok(&["image", "inspect", "--format", "{{json .Config}}", &image]))
        .expect("the image's config");
    assert_eq!(config["Entrypoint"], json!(the_dockerfile_entrypoint()), "the Dockerfile's entrypoint: {config}");
    assert!(config["ExposedPorts"].get("50030/tcp").is_some(), "port 50030 like the Dockerfile: {config}");
    let size_mb =
        podman_ok(&["image", "inspect", "--format", "{{.Size}}", &image]).trim().parse::<u64>().unwrap() / 1_000_000;

    // The pod's volumes on this machine; the kubelet root shared as the kubelet makes it.
    let dirs = HostDirs::make(tmp.path(), &pod, &container, &secret_files);
    let args = container.args.clone().unwrap_or_default();
    let kubelet_dir = flag(&args, "--kubelet-dir").expect("--kubelet-dir").to_string();
    let state_dir = flag(&args, "--state-dir").expect("--state-dir").to_string();
    let host_of = |container_dir: &str| {
        let m = container.volume_mounts.iter().flatten().find(|m| m.mount_path == container_dir);
        dirs.by_volume[&m.unwrap_or_else(|| panic!("{container_dir} is not a volume mount")).name].clone()
    };
    let (kubelet_host, state_host) = (host_of(&kubelet_dir), host_of(&state_dir));
    let _kubelet_shared = shared_mount(&kubelet_host);

    let name = format!("soda-syncer-image-test-{unique}");
    let mut run: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        format!("--name={name}"),
        // A pod's hostname is its name.
        format!("--hostname={POD}"),
        // The host's network, to reach the API server stand-in and the
        // agent on 127.0.0.1 (the pod's own network and hostPort 50030
        // cannot be had here, and another agent may hold that port).
        "--network=host".into(),
    ];
    // These machines refuse to raise resource limits in containers (no
    // CAP_SYS_RESOURCE, and conmon runs with RLIMIT_NPROC 32768): podman's
    // defaults would fail, so the container keeps ours (nofile) and 4096
    // processes. The chart sets none; a node's containerd passes its own.
    let nofile = rlimit(libc::RLIMIT_NOFILE);
    run.push(format!("--ulimit=nofile={nofile}:{nofile}"));
    run.push("--ulimit=nproc=4096:4096".into());
    run.extend(podman_flags(&pod, &container, &dirs));
    // In a pod the agent uses the service account and KUBERNETES_SERVICE_HOST,
    // which in-cluster config requires to be HTTPS; the stand-in speaks
    // plain HTTP, so the agent is pointed at it with a kubeconfig instead.
    run.push(format!(
        "--mount=type=bind,source={},destination=/run/soda-syncer-test/kubeconfig,ro=true",
        kubeconfig.display()
    ));
    run.push("--env=SODA_SYNCER_KUBECONFIG=/run/soda-syncer-test/kubeconfig".into());
    run.push(image.clone());
    run.extend(args.iter().cloned());
    // The chart listens on 0.0.0.0:50030 in the pod's network namespace;
    // here the host's is shared, so loopback and a free port (the agent
    // writes its URL into the state directory).
    run.push("--listen=127.0.0.1:0".into());

    let log = tmp.path().join("container.log");
    let logf = std::fs::File::create(&log).unwrap();
    let _container = ContainerGuard(name.clone());
    let started = Instant::now();
    let child = podman().args(&run).stdout(logf.try_clone().unwrap()).stderr(logf).spawn().expect("podman run");
    let mut agent =
        AgentProc { child, state_dir: state_host.clone(), log: log.clone(), url: String::new(), args: run, token };
    let url_file = state_host.join("agent.url");
    agent.url = eventually(60, "the agent's URL in the state directory", || {
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!("the container ended with {status} before listening:\n{}", agent.log_text());
        }
        std::fs::read_to_string(&url_file).ok().filter(|u| u.starts_with("http")).map(|u| u.trim().to_string())
    })
    .await;
    let ready_path = container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|g| g.path.clone());
    let ready_path = ready_path.expect("a readiness probe with an httpGet path");
    let ready = loop {
        let (status, v) = agent.call_with_token("GET", &ready_path, None, None).await;
        if status == 200 {
            break v;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not ready within 60 s: {v}\n{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ready_secs = started.elapsed().as_secs_f64();

    // The image's restic, Debian 13's: the only one in the container.
    let restic_version = ready["restic"]["version"].as_str().expect("restic's version in /readyz").to_string();
    let in_image = podman_ok(&["exec", &name, "restic", "version"]);
    assert!(in_image.starts_with(&format!("restic {restic_version} ")), "{in_image} vs /readyz {ready}");
    assert!(restic_version.starts_with(DEBIAN_13_RESTIC), "Debian 13's restic is {DEBIAN_13_RESTIC}x: {ready}");
    let status = agent.get("/v1/status").await;
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"), "{status}");
    assert_eq!(status["restic"]["version"], restic_version, "{status}");
    assert_eq!(status["restic"]["support"], "supported", "{status}");
    assert!(!status["restic"]["features"].as_array().unwrap().is_empty(), "0.18 offers newer features: {status}");
    // The versions at start, in the log (JSON lines, as the chart's --log-json asks).
    let text = agent.log_text();
    let starting = log_lines(&text, "soda-syncer starting");
    assert_eq!(starting.len(), 1, "one start line:\n{text}");
    assert_eq!(starting[0]["fields"]["version"], env!("CARGO_PKG_VERSION"));
    let found = log_lines(&text, "restic found");
    assert_eq!(found.first().map(|l| &l["fields"]["version"]), Some(&json!(restic_version)), "{text}");
    // The container talks to the API server: its liveness Lease, held by the pod.
    eventually(30, "the agent's liveness Lease", || {
        api.list("coordination.k8s.io/v1", "Lease", Some("soda-syncer"))
            .into_iter()
            .find(|l| l["spec"]["holderIdentity"] == POD)
    })
    .await;

    // A volume the kubelet mounts after the agent started.
    let data = tmp.path().join("volume-data");
    build_tree(&data);
    let volume = format!("pods/{unique}/volumes/kubernetes.io~csi/pv-image/mount");
    let _volume = BindMount::new(&data, &kubelet_host.join(&volume)).expect("mount the volume");
    let source = format!("{kubelet_dir}/{volume}");
    let policy = agent
        .create_policy(
            json!({"name": "image-volume", "source": {"path": source}, "schedule": {"intervalSeconds": 3600}}),
        )
        .await;
    let id = policy["id"].as_str().unwrap().to_string();
    let runs = agent
        .wait_runs(&id, 120, "the first backup", |r| {
            r.iter().any(|r| r["state"] != "queued" && r["state"] != "running")
        })
        .await;
    assert_eq!(count_state(&runs, "succeeded"), 1, "{runs:?}\n{}", agent.log_text());
    let snapshot = runs[0]["snapshotId"].as_str().expect("the run's snapshot").to_string();

    // Restored with owners, modes, times, links and xattrs into a new directory.
    let target = format!("{kubelet_dir}/pods/{unique}/volumes/kubernetes.io~csi/pv-image/restored");
    let (st, r) = agent
        .call(
            "POST",
            &format!("/v1/policies/{id}/restore"),
            Some(json!({"snapshot": snapshot, "target": target, "verify": true})),
        )
        .await;
    assert_eq!(st, 202, "{r}\n{}", agent.log_text());
    let restore_id = r["id"].as_str().unwrap().to_string();
    let runs = agent
        .wait_runs(&id, 120, "the restore", |r| {
            r.iter().any(|r| r["id"] == restore_id.as_str() && r["state"] != "queued" && r["state"] != "running")
        })
        .await;
    let restore = runs.iter().find(|r| r["id"] == restore_id.as_str()).unwrap();
    assert_eq!(restore["state"], "succeeded", "{restore}\n{}", agent.log_text());
    let restored = kubelet_host.join(format!("pods/{unique}/volumes/kubernetes.io~csi/pv-image/restored"));
    let (before, after) = (snapshot_tree(&data), snapshot_tree(&restored));
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (path, b) in &before {
        assert_eq!(Some(b), after.get(path), "{} differs after the restore in the container", path.display());
    }
    let ino = |p: &str| std::fs::metadata(restored.join(p)).unwrap().ino();
    assert_eq!(ino("small.txt"), ino("dir/hardlink.txt"), "hard links stay hard links");

    // The repository is in the state directory's hostPath: the host's restic
    // reads it, and the snapshot says which restic wrote it and for which node.
    let repo = state_host.join("repository");
    let password = std::fs::read_to_string(state_host.join("repository.password")).unwrap();
    let listed: Value = serde_json::from_str(
        &restic(&repo.display().to_string(), password.trim(), &[], &["snapshots", "--json"]).unwrap(),
    )
    .unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["paths"], json!([source]));
    assert_eq!(listed[0]["hostname"], NODE, "restic's --host is the node's name from the downward API");
    let raw = podman_ok(&[
        "exec",
        &format!("--env=RESTIC_PASSWORD_FILE={state_dir}/repository.password"),
        &name,
        "restic",
        "--no-cache",
        "--repo",
        &format!("{state_dir}/repository"),
        "cat",
        "snapshot",
        listed[0]["id"].as_str().unwrap(),
    ]);
    let raw: Value = serde_json::from_str(&raw).expect("the snapshot's JSON");
    assert_eq!(
        raw["program_version"],
        format!("restic {restic_version}"),
        "the snapshot was written by the image's restic"
    );
    let host_restic =
        Command::new("restic").arg("version").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());

    // SIGTERM with the pod's grace period: the agent stops cleanly.
    let grace = pod.termination_grace_period_seconds.unwrap_or(30);
    let stopping = Instant::now();
    podman_ok(&["stop", "--time", &grace.to_string(), &name]);
    let status = agent.child.wait().unwrap();
    let stop_secs = stopping.elapsed().as_secs_f64();
    assert!(status.success(), "the agent's exit after SIGTERM: {status}\n{}", agent.log_text());
    assert!(stop_secs < grace as f64, "stopped after {stop_secs:.1} s, not within the grace period of {grace} s");
    assert_eq!(log_lines(&agent.log_text(), "signal received").len(), 1, "{}", agent.log_text());

    println!(
        "image {image}: {size_mb} MB, built in {build_secs:.1} s; ready {ready_secs:.1} s after podman run; \
         restic {restic_version} in the image (host: {}); stopped in {stop_secs:.1} s",
        host_restic.unwrap_or_default().split_whitespace().nth(1).unwrap_or("none")
    );
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn rlimit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid resource and a pointer to a rlimit we own.
    assert_eq!(unsafe { libc::getrlimit(resource, &mut r) }, 0);
    r.rlim_cur
}

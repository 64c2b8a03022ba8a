//! Application hooks through `pods/exec`: the pods on this node that use a
//! claim (from the discovery view, in memory only), and one command run in
//! a container over the API server's WebSocket channel protocol, within a
//! timeout. Past the timeout the connection is dropped and the hook counts
//! as failed.

use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use kube::api::AttachParams;
use kube::Api;
use soda_syncer_domain::annotations::{self, PodHook};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::view::View;
use crate::scheduler::{HookExit, PodHookCall, PodHookSet, PodHooks};

/// How much of a hook's stdout and of its stderr is kept (the end of each).
const OUTPUT_LIMIT: usize = 2048;

pub struct PodExec {
    client: kube::Client,
    view: Arc<View>,
}

impl PodExec {
    pub(super) fn new(client: kube::Client, view: Arc<View>) -> PodExec {
        PodExec { client, view }
    }

    async fn run(&self, hook: &PodHookCall) -> Result<HookExit, String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &hook.namespace);
        let params = AttachParams::default().container(hook.container.clone()).stdin(false).stdout(true).stderr(true);
        let work = async {
            let mut attached = api
                .exec(&hook.pod, hook.command.clone(), &params)
                .await
                .map_err(|e| format!("could not be started through pods/exec: {e}"))?;
            let status = attached.take_status();
            let (out, err) = tokio::join!(tail(attached.stdout()), tail(attached.stderr()));
            let status = match status {
                Some(s) => s.await,
                None => None,
            };
            let _ = attached.join().await;
            let output = [out, err].into_iter().filter(|s| !s.trim().is_empty()).collect::<Vec<_>>().join("\n");
            let Some(status) = status else {
                return Err("ended without an exit status (the connection closed)".to_string());
            };
            if status.status.as_deref() == Some("Success") {
                return Ok(HookExit { code: 0, output });
            }
            let code = status
                .details
                .as_ref()
                .and_then(|d| d.causes.as_ref())
                .into_iter()
                .flatten()
                .find(|c| c.reason.as_deref() == Some("ExitCode"))
                .and_then(|c| c.message.as_deref()?.parse::<i32>().ok());
            match code {
                Some(code) => Ok(HookExit { code, output }),
                None => Err(format!(
                    "failed: {}",
                    status
                        .message
                        .filter(|m| !m.is_empty())
                        .or(status.reason)
                        .unwrap_or_else(|| "no reason given".into())
                )),
            }
        };
        match tokio::time::timeout(hook.timeout, work).await {
            Ok(r) => r,
            Err(_) => {
                Err(format!("did not finish within its timeout of {} s and was abandoned", hook.timeout.as_secs()))
            }
        }
    }
}

/// Read a stream to its end, keeping its last `OUTPUT_LIMIT` bytes.
async fn tail(r: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut r) = r else { return String::new() };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > OUTPUT_LIMIT {
            kept.drain(..kept.len() - OUTPUT_LIMIT);
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn call(namespace: &str, pod: &str, first_container: &str, h: PodHook) -> PodHookCall {
    PodHookCall {
        namespace: namespace.into(),
        pod: pod.into(),
        container: h.container.unwrap_or_else(|| first_container.into()),
        command: h.command,
        timeout: Duration::from_secs(h.timeout_seconds),
        on_error: h.on_error,
    }
}

impl PodHooks for PodExec {
    fn hooks_for(&self, claim: &str) -> Result<Vec<PodHookSet>, String> {
        let mut out = Vec::new();
        for p in self.view.pods_using(claim) {
            if p.hooks.is_empty() {
                continue;
            }
            let hooks = annotations::parse_pod_hooks(&p.hooks)
                .map_err(|e| format!("pod {}/{}: annotation {}: {}", p.namespace, p.name, e.field, e.message))?;
            out.push(PodHookSet {
                namespace: p.namespace.clone(),
                pod: p.name.clone(),
                pre: hooks.pre.map(|h| call(&p.namespace, &p.name, &p.first_container, h)),
                post: hooks.post.map(|h| call(&p.namespace, &p.name, &p.first_container, h)),
            });
        }
        Ok(out)
    }

    fn exec<'a>(&'a self, hook: &'a PodHookCall) -> BoxFuture<'a, Result<HookExit, String>> {
        Box::pin(self.run(hook))
    }
}

//! The `pods/exec` subresource: a WebSocket upgrade speaking the channel
//! protocol (`v5.channel.k8s.io` or `v4.channel.k8s.io`; binary frames whose
//! first byte is the channel: 1 stdout, 2 stderr, 3 the final
//! `metav1.Status`). The stand-in runs no containers: the command runs on
//! the test host (argv as given, no shell) only when the test enabled it
//! with [`super::KubeStandin::exec_runs_locally`]; otherwise it fails with
//! exit code 126. Every exec is recorded. Closing the connection kills the
//! local process.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, Response, StatusCode};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::store::{self, ApiError};
use super::Shared;

/// One `pods/exec` call the stand-in received.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecRecord {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub command: Vec<String>,
}

/// `/api/v1/namespaces/{ns}/pods/{name}/exec` → (ns, name).
pub(crate) fn exec_target(path: &str) -> Option<(String, String)> {
    match path.trim_matches('/').split('/').collect::<Vec<_>>().as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name, "exec"] => Some((ns.to_string(), name.to_string())),
        _ => None,
    }
}

const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

pub(crate) fn handle(
    shared: &Arc<Shared>,
    ns: &str,
    pod_name: &str,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    if !matches!(req.method().as_str(), "GET" | "POST") {
        return Err(ApiError::new(405, "MethodNotAllowed", "the server does not allow this method"));
    }
    let q: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes()).into_owned().collect();
    let command: Vec<String> = q.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.clone()).collect();
    if command.is_empty() {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    let res = store::find("", "v1", "pods").expect("pods");
    let pod = shared.store.lock().unwrap().get(res, ns, pod_name).map(|o| o.value());
    let Some(pod) = pod else {
        return Err(ApiError::new(404, "NotFound", format!("pods \"{pod_name}\" not found")));
    };
    let containers: Vec<String> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect();
    let container = match q.iter().find(|(k, _)| k == "container").map(|(_, v)| v.clone()) {
        Some(c) => c,
        None if containers.len() == 1 => containers[0].clone(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {pod_name}, choose one of: {containers:?}"
            )))
        }
    };
    if !containers.contains(&container) {
        return Err(ApiError::new(404, "NotFound", format!("container {container} is not valid for pod {pod_name}")));
    }
    // The WebSocket handshake (RFC 6455) with a channel subprotocol.
    let headers = req.headers();
    let upgrade = headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let key = headers.get(header::SEC_WEBSOCKET_KEY).and_then(|v| v.to_str().ok()).map(str::to_string);
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_string()))
        .collect();
    let (Some(key), true) = (key, upgrade.eq_ignore_ascii_case("websocket")) else {
        return Err(ApiError::bad_request("exec needs a WebSocket upgrade"));
    };
    let Some(protocol) = PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        return Err(ApiError::bad_request(format!("none of the offered subprotocols {offered:?} is supported")));
    };
    shared.execs.lock().unwrap().push(ExecRecord {
        namespace: ns.into(),
        pod: pod_name.into(),
        container,
        command: command.clone(),
    });
    let run_locally = *shared.exec_local.lock().unwrap();
    let upgraded = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgraded.await else { return };
        let ws = WebSocketStream::from_raw_socket(hyper_util::rt::TokioIo::new(upgraded), Role::Server, None).await;
        session(ws, command, run_locally).await;
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()))
        .header(header::SEC_WEBSOCKET_PROTOCOL, *protocol)
        .body(Body::empty())
        .expect("response"))
}

fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

fn failure(code: i32, message: &str) -> Value {
    json!({
        "metadata": {}, "status": "Failure", "message": message, "reason": "NonZeroExitCode",
        "details": { "causes": [{ "reason": "ExitCode", "message": code.to_string() }] },
    })
}

async fn session<S>(ws: WebSocketStream<S>, command: Vec<String>, run_locally: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut tx, mut rx) = ws.split();
    let status = if !run_locally {
        let _ = tx.send(frame(2, b"the stand-in runs no containers (exec_runs_locally is off)\n")).await;
        failure(126, "command terminated with non-zero exit code: the stand-in runs no containers")
    } else {
        let child = tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        match child {
            Err(e) => json!({
                "metadata": {}, "status": "Failure", "reason": "InternalError",
                "message": format!("failed to exec in container: starting container process caused: exec: {:?}: {e}", command[0]),
            }),
            Ok(mut child) => {
                let mut out = child.stdout.take().expect("piped");
                let mut err = child.stderr.take().expect("piped");
                let (mut ob, mut eb) = ([0u8; 4096], [0u8; 4096]);
                let (mut out_open, mut err_open) = (true, true);
                let waited = loop {
                    tokio::select! {
                        n = out.read(&mut ob), if out_open => match n {
                            Ok(n) if n > 0 => { if tx.send(frame(1, &ob[..n])).await.is_err() { break None } }
                            _ => out_open = false,
                        },
                        n = err.read(&mut eb), if err_open => match n {
                            Ok(n) if n > 0 => { if tx.send(frame(2, &eb[..n])).await.is_err() { break None } }
                            _ => err_open = false,
                        },
                        w = child.wait(), if !out_open && !err_open => break Some(w),
                        m = rx.next() => match m {
                            // The client went away: kill the process (kill_on_drop).
                            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break None,
                            Some(Ok(_)) => {}
                        },
                    }
                };
                match waited {
                    None => {
                        let _ = child.kill().await;
                        return;
                    }
                    Some(Ok(s)) if s.success() => json!({ "metadata": {}, "status": "Success" }),
                    Some(Ok(s)) => {
                        let code = s.code().unwrap_or(137);
                        failure(code, &format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", command.join(" ")))
                    }
                    Some(Err(e)) => {
                        json!({ "metadata": {}, "status": "Failure", "reason": "InternalError", "message": e.to_string() })
                    }
                }
            }
        }
    };
    let _ = tx.send(frame(3, &serde_json::to_vec(&status).expect("json"))).await;
    let _ = tx.send(Message::Close(None)).await;
    let _ = tx.flush().await;
}

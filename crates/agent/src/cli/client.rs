//! The HTTP client to the agent: where the agent is (the URL and token a
//! local agent wrote), requests with its token, errors as the API states
//! them, listings read page by page, and following a run's events.

use anyhow::{bail, Context};
use serde_json::Value;
use std::time::Duration;

use super::show::s;
use super::ClientArgs;
use crate::ids::percent_encode as enc;

pub(super) struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub(super) fn new(args: &ClientArgs) -> Client {
        let base = args.server.clone().unwrap_or_else(|| {
            let dir = args.agent_state_dir.clone().unwrap_or_else(crate::config::default_state_dir);
            std::fs::read_to_string(crate::config::url_file(&dir))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "http://127.0.0.1:50030".into())
        });
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60)).use_rustls_tls();
        if let Some(ca) = &args.ca_file {
            match std::fs::read(ca)
                .map_err(|e| e.to_string())
                .and_then(|pem| reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string()))
            {
                Ok(cert) => builder = builder.add_root_certificate(cert),
                Err(e) => eprintln!("warning: --ca-file {}: {e}", ca.display()),
            }
        }
        let http = builder.build().expect("HTTP client");
        // No --token: the token a local agent generated, when readable.
        let token = args.token.clone().or_else(|| {
            let dir = args.agent_state_dir.clone().unwrap_or_else(crate::config::default_state_dir);
            std::fs::read_to_string(crate::config::token_file(&dir))
                .ok()
                .and_then(|t| t.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).map(String::from))
        });
        Client { base: base.trim_end_matches('/').to_string(), token, http }
    }

    pub(super) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub(super) async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the agent at {}: is it running? (set --server)", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        if !status.is_success() {
            let code = value["error"]["code"].as_str().unwrap_or("error");
            let msg = value["error"]["message"].as_str().map(str::to_string).unwrap_or_else(|| value.to_string());
            bail!("{msg} ({code}, HTTP {})", status.as_u16());
        }
        Ok(value)
    }
}

/// Every page of `GET /v1/policies`, so the list is complete.
pub(super) async fn all_policies(c: &Client) -> anyhow::Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        let v = c.call(reqwest::Method::GET, &format!("/v1/policies?limit=1000&after={}", enc(&after)), None).await?;
        all.extend(v["policies"].as_array().cloned().unwrap_or_default());
        match v["next"].as_str() {
            Some(n) if !n.is_empty() => after = n.to_string(),
            _ => break,
        }
    }
    Ok(all)
}

/// Give each run of a `{"runs": [...]}` its policy's name (`policyName`),
/// for the table: people know their policies by name, not by id. A run of
/// a deleted policy keeps only its id.
pub(super) async fn name_policies(c: &Client, v: &mut Value) -> anyhow::Result<()> {
    let names: std::collections::HashMap<String, Value> = all_policies(c)
        .await?
        .into_iter()
        .filter_map(|p| Some((p["id"].as_str()?.to_string(), p["name"].clone())))
        .collect();
    for r in v["runs"].as_array_mut().into_iter().flatten() {
        if let Some(name) = r["policyId"].as_str().and_then(|id| names.get(id)) {
            r["policyName"] = name.clone();
        }
    }
    Ok(())
}

/// Follow `GET /v1/runs/{id}/events` (server-sent events) until the `end`
/// event, drawing a progress bar on a terminal (nothing otherwise).
pub(super) async fn follow_run(c: &Client, id: &str) -> anyhow::Result<Value> {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut resp = c.request(reqwest::Method::GET, &format!("/v1/runs/{}/events", enc(id))).send().await?;
    if !resp.status().is_success() {
        bail!("cannot follow run {id}: HTTP {}", resp.status().as_u16());
    }
    let mut buf = String::new();
    let mut last: Option<Value> = None;
    while let Some(chunk) = resp.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let event =
                frame.lines().find_map(|l| l.strip_prefix("event:")).map(str::trim).unwrap_or("message").to_string();
            let data: String = frame.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect();
            let Ok(run) = serde_json::from_str::<Value>(&data) else { continue };
            let p = &run["progress"];
            bar.set_length(p["totalBytes"].as_u64().unwrap_or(0));
            bar.set_position(p["bytesDone"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "{} {}/{}",
                s(&run["state"]),
                p["filesDone"].as_u64().unwrap_or(0),
                p["totalFiles"].as_u64().unwrap_or(0)
            ));
            bar.tick();
            if event == "end" {
                bar.finish_and_clear();
                return Ok(run);
            }
            last = Some(run);
        }
    }
    bar.finish_and_clear();
    // The stream ended early (agent restarted?): ask once more.
    match c.call(reqwest::Method::GET, &format!("/v1/runs/{}", enc(id)), None).await {
        Ok(v) => Ok(v),
        Err(e) => last.ok_or(e),
    }
}

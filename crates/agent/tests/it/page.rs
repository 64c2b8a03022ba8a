//! The web page at `/` in a real browser: Debian's Chromium, headless,
//! driven through its DevTools protocol (a small client over a websocket)
//! against the real `soda-syncer` binary and the real restic. Login through
//! the page's form (a wrong token first), a policy and its runs, a backup
//! started from the page and followed to its end, a restore into a new
//! directory checked byte for byte on disk, the phone layout; and, without
//! the browser, the session cookie's flags and the CSRF rule.
//!
//! With `SODA_SYNCER_SCREENSHOTS=<dir>` the browser test writes its
//! screenshots there (scripts/screenshots uses it for docs/).

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::kube::{eventually, Cluster};
use crate::support::{count_state, AgentProc};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Headless Chromium in its own process group with a profile directory of
/// its own; both go on drop, also when the test fails.
struct Chromium {
    child: Child,
    profile: PathBuf,
    port: u16,
}

impl Chromium {
    fn start() -> Chromium {
        assert!(
            Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: run scripts/install-deps (it installs Debian's chromium and fonts-dejavu-core)"
        );
        let profile = tempfile::Builder::new().prefix("soda-page-chromium-").tempdir().unwrap().keep();
        use std::os::unix::process::CommandExt;
        let child = Command::new(CHROMIUM)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-sync",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: the renderer and helper processes go with it.
            .process_group(0)
            .spawn()
            .expect("starting chromium");
        let mut browser = Chromium { child, profile, port: 0 };
        // The first line of DevToolsActivePort is the port it bound.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(browser.profile.join("DevToolsActivePort")).unwrap_or_default();
            if let Some(port) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                browser.port = port;
                return browser;
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                panic!("chromium exited with {status} before opening its DevTools port");
            }
            assert!(Instant::now() < deadline, "chromium did not write DevToolsActivePort within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The DevTools connection to the browser's first page.
    async fn page(&self) -> Cdp {
        let list: Value =
            reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port)).await.unwrap().json().await.unwrap();
        let url = list
            .as_array()
            .and_then(|l| l.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("chromium lists no page: {list}"))
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
        Cdp { ws, next_id: 0 }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on the process group this test created (its
        // leader's pid), then on the leader itself.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A DevTools protocol client for one page: commands by id, events skipped.
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 20 s"))
                .expect("the DevTools connection closed")
                .unwrap();
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluate `expr` in the page (promises awaited) and return its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call("Runtime.evaluate", json!({"expression": expr, "returnByValue": true, "awaitPromise": true}))
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {}", r["exceptionDetails"]);
        r["result"]["value"].clone()
    }

    /// Poll `expr` until it is true; on timeout show what the page shows.
    async fn wait_for(&mut self, expr: &str, secs: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.eval(expr).await == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body.innerText").await;
                panic!(
                    "timed out after {secs} s waiting for {what} ({expr}); the page shows:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn click(&mut self, selector: &str) {
        let found = self.eval(&format!("(() => {{ const e = document.querySelector({selector:?}); if (!e) return false; e.click(); return true; }})()")).await;
        assert_eq!(found, Value::Bool(true), "nothing to click at {selector}");
    }

    /// Focus a field, empty it, and type `text` as keyboard input.
    async fn type_into(&mut self, selector: &str, text: &str) {
        let found = self.eval(&format!("(() => {{ const e = document.querySelector({selector:?}); if (!e) return false; e.focus(); e.value = ''; return document.activeElement === e; }})()")).await;
        assert_eq!(found, Value::Bool(true), "cannot focus {selector}");
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// Press Enter in the focused element, as a keyboard user does.
    async fn press_enter(&mut self) {
        for ty in ["keyDown", "keyUp"] {
            let mut p = json!({"type": ty, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13});
            if ty == "keyDown" {
                p["text"] = json!("\r");
            }
            self.call("Input.dispatchKeyEvent", p).await;
        }
    }

    async fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        )
        .await;
    }

    /// A PNG of the viewport, kept where `SODA_SYNCER_SCREENSHOTS` says.
    async fn screenshot(&mut self, name: &str) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"})).await;
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD.decode(r["data"].as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        if let Some(dir) = std::env::var_os("SODA_SYNCER_SCREENSHOTS") {
            std::fs::write(Path::new(&dir).join(name), png).unwrap();
        }
    }
}

/// Type the agent's token into the login form and press Enter.
async fn log_in(page: &mut Cdp, agent: &AgentProc) {
    page.type_into("#token", &agent.token).await;
    page.press_enter().await;
    page.wait_for(&is_visible("app"), 10, "the logged-in page").await;
}

fn is_visible(id: &str) -> String {
    format!("(() => {{ const e = document.getElementById({id:?}); return !!e && !e.hidden && e.offsetParent !== null; }})()")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_logs_in_backs_up_and_restores_into_a_new_directory_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("volume");
    std::fs::create_dir_all(source.join("sub")).unwrap();
    std::fs::write(source.join("hello.txt"), b"hello from the web page\n").unwrap();
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(source.join("sub/blob.bin"), &blob).unwrap();
    // A pre hook that sleeps keeps each backup running for 2 s: long
    // enough for the page to show it live.
    let agent = AgentProc::start(&tmp.path().join("state"), &["--hook-allow", "/usr/bin/sleep"]).unwrap();
    let repo = tmp.path().join("repo");
    let policy = agent
        .create_policy(json!({"name": "web-demo", "source": {"path": source}, "schedule": {"intervalSeconds": 3600},
            "repository": {"url": repo, "password": "page-pw"},
            "consistency": {"hooks": {"pre": [["/usr/bin/sleep", "2"]]}}}))
        .await;
    let id = policy["id"].as_str().unwrap().to_string();
    let runs = agent.wait_runs(&id, 60, "the first backup", |r| count_state(r, "succeeded") >= 1).await;
    let first_run = runs[0]["id"].as_str().unwrap().to_string();
    // A policy whose runs fail: the same repository, the wrong password.
    let broken = agent
        .create_policy(
            json!({"name": "wrong-password", "source": {"path": source}, "schedule": {"intervalSeconds": 3600},
            "repository": {"url": repo, "password": "not-page-pw"}}),
        )
        .await;
    let broken_id = broken["id"].as_str().unwrap().to_string();
    agent.wait_runs(&broken_id, 60, "the failed backup", |r| r[0]["state"] == "failed").await;
    // A volume nobody writes to, backed up every 2 s: its scheduled runs are
    // proven unchanged (README, "Unchanged volumes").
    let still = tmp.path().join("still");
    std::fs::create_dir_all(&still).unwrap();
    std::fs::write(still.join("f"), b"unchanging").unwrap();
    let quiet = agent
        .create_policy(json!({"name": "unchanged-demo", "source": {"path": still}, "schedule": {"intervalSeconds": 2},
            "repository": {"url": repo, "password": "page-pw"}}))
        .await;
    let quiet_id = quiet["id"].as_str().unwrap().to_string();
    let quiet_runs =
        agent.wait_runs(&quiet_id, 60, "an unchanged run", |r| r.iter().any(|x| x["unchanged"].is_object())).await;
    let unchanged_run = quiet_runs.iter().find(|x| x["unchanged"].is_object()).unwrap().clone();

    let started = Instant::now();
    let browser = Chromium::start();
    let mut page = browser.page().await;
    page.viewport(1280, 900, false).await;
    page.call("Page.navigate", json!({"url": format!("{}/", agent.url)})).await;

    // Not logged in: the login form, nothing else.
    page.wait_for(&is_visible("login-form"), 15, "the login form").await;
    assert_eq!(page.eval(&is_visible("app")).await, json!(false));
    assert_eq!(page.eval("document.querySelector('label[for=token]').textContent").await, json!("API token"));

    // A wrong token: a clear error, still the form.
    page.type_into("#token", "not-the-token").await;
    page.press_enter().await;
    page.wait_for(
        "document.getElementById('login-error').textContent.includes('Wrong token')",
        10,
        "the wrong-token error",
    )
    .await;
    let err = page.eval("document.getElementById('login-error').textContent").await;
    assert!(err.as_str().unwrap().contains("token file"), "the error says where the token is: {err}");
    assert_eq!(page.eval(&is_visible("app")).await, json!(false));

    // The right token, typed and submitted with Enter.
    log_in(&mut page, &agent).await;
    page.wait_for(
        "!!document.querySelector('[data-policy=\"web-demo\"] [data-state=succeeded]')",
        10,
        "the policy and its run",
    )
    .await;
    let html = page.eval("document.documentElement.outerHTML").await;
    assert!(!html.as_str().unwrap().contains(&agent.token), "the token is not in the page");
    assert_eq!(page.eval("document.cookie").await, json!(""), "the session cookie is HttpOnly");
    assert_eq!(page.eval("document.getElementById('token').value").await, json!(""), "the field was cleared");
    // Every control is a native, focusable one with a name a screen reader reads.
    let unnamed = page
        .eval(
            "[...document.querySelectorAll('button, input, select, a')].filter(e => !(e.labels && e.labels.length) \
             && !e.getAttribute('aria-label') && !e.textContent.trim()).map(e => e.outerHTML)",
        )
        .await;
    assert_eq!(unnamed, json!([]), "controls without a label");
    // A failed run's details show its error.
    page.click("[data-policy=\"wrong-password\"] [data-state=failed]").await;
    page.wait_for(
        "document.getElementById('run-error').textContent.startsWith('wrong_password: ')",
        10,
        "the failed run's error",
    )
    .await;
    // An unchanged run's details say since which snapshot, and how it was proven.
    page.wait_for(
        &format!("!!document.querySelector('[data-run={:?}]')", unchanged_run["id"].as_str().unwrap()),
        20,
        "the unchanged run in the timeline",
    )
    .await;
    page.click(&format!("[data-run={:?}]", unchanged_run["id"].as_str().unwrap())).await;
    page.wait_for("!!document.getElementById('run-unchanged')", 10, "the unchanged run's details").await;
    let said = page.eval("document.getElementById('run-unchanged').textContent").await;
    let short: String = unchanged_run["unchanged"]["snapshotId"].as_str().unwrap().chars().take(8).collect();
    let said = said.as_str().unwrap();
    assert!(
        said.starts_with(&format!("unchanged since snapshot {short} (backed up "))
            && said.contains("verified ")
            && said.contains("by a walk of"),
        "{said}"
    );
    page.click("[data-policy=\"wrong-password\"] [data-state=failed]").await;
    page.wait_for(
        "document.getElementById('run-error').textContent.startsWith('wrong_password: ')",
        10,
        "the failed run's error again",
    )
    .await;
    page.screenshot("page-policies.png").await;
    assert_eq!(
        page.eval("document.getElementById('cluster').hidden").await,
        json!(true),
        "no cluster view without Kubernetes"
    );

    // A backup from the page, followed to its end through the event stream.
    // The panel shows the failed run now; the new run replaces it.
    let shown = page.eval("document.getElementById('run').dataset.runId").await.as_str().unwrap().to_string();
    // By keyboard: focus the button and press Enter.
    let focused = page
        .eval("(() => { const b = document.querySelector('[data-policy=\"web-demo\"] [data-action=backup]'); b.focus(); return document.activeElement === b; })()")
        .await;
    assert_eq!(focused, json!(true));
    page.press_enter().await;
    page.wait_for(
        &format!("(() => {{ const r = document.getElementById('run'); return !r.hidden && !!r.dataset.runId && r.dataset.runId !== {first_run:?} && r.dataset.runId !== {shown:?}; }})()"),
        10,
        "the new run's details",
    )
    .await;
    let run_id = page.eval("document.getElementById('run').dataset.runId").await.as_str().unwrap().to_string();
    page.wait_for(
        "(() => { const r = document.getElementById('run'); return r.dataset.state === 'running' && r.dataset.via === 'events'; })()",
        10,
        "the run shown running, live from its event stream",
    )
    .await;
    assert_eq!(page.eval(&is_visible("run-progress-box")).await, json!(true), "a progress bar while it runs");
    assert_eq!(page.eval(&is_visible("run-cancel")).await, json!(true), "a cancel button while it runs");
    page.wait_for("document.getElementById('run').dataset.state === 'succeeded'", 60, "the backup to succeed").await;
    assert_eq!(
        page.eval("document.getElementById('run').dataset.via").await,
        json!("events"),
        "the end came through the run's event stream"
    );
    let run = agent.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!(
        (run["kind"].as_str(), run["trigger"].as_str(), run["state"].as_str()),
        (Some("backup"), Some("manual"), Some("succeeded"))
    );
    assert_eq!(page.eval("document.getElementById('run-state').textContent").await, json!("succeeded"));
    page.wait_for(
        &format!("!!document.querySelector('[data-policy=\"web-demo\"] [data-run={run_id:?}][data-state=succeeded]')"),
        15,
        "the run in the policy's timeline",
    )
    .await;
    page.screenshot("page-run.png").await;

    // Restore: in place stays disabled until the policy's name is typed.
    page.click("[data-policy=\"web-demo\"] [data-action=restore]").await;
    page.wait_for(&is_visible("restore-form"), 10, "the restore form").await;
    page.wait_for("document.getElementById('restore-snapshot').options.length >= 3", 15, "the snapshot list").await;
    page.click("#restore-inplace").await;
    assert_eq!(page.eval("document.getElementById('restore-submit').disabled").await, json!(true));
    page.type_into("#restore-confirm", "web-dem").await;
    assert_eq!(page.eval("document.getElementById('restore-submit').disabled").await, json!(true));
    page.type_into("#restore-confirm", "web-demo").await;
    assert_eq!(
        page.eval("document.getElementById('restore-submit').disabled").await,
        json!(false),
        "the typed name confirms"
    );
    assert_eq!(page.eval("document.getElementById('restore-submit').textContent").await, json!("Restore in place"));
    page.click("#restore-inplace").await;
    assert_eq!(page.eval("document.getElementById('restore-submit').disabled").await, json!(false));
    // Into a new directory.
    let target = tmp.path().join("restored");
    page.type_into("#restore-target", target.to_str().unwrap()).await;
    page.screenshot("page-restore.png").await;
    page.click("#restore-submit").await;
    page.wait_for(
        "(() => { const r = document.getElementById('run'); return !r.hidden && document.getElementById('run-details').textContent.includes('restore'); })()",
        10,
        "the restore run's details",
    )
    .await;
    page.wait_for("document.getElementById('run').dataset.state === 'succeeded'", 60, "the restore to succeed").await;
    assert_eq!(std::fs::read(target.join("hello.txt")).unwrap(), b"hello from the web page\n");
    assert_eq!(std::fs::read(target.join("sub/blob.bin")).unwrap(), blob, "the restored bytes are the source's");
    assert_eq!(
        std::fs::read(source.join("hello.txt")).unwrap(),
        b"hello from the web page\n",
        "the source is untouched"
    );

    // In place, once confirmed: a damaged file on the volume comes back.
    std::fs::write(source.join("hello.txt"), b"damaged").unwrap();
    let shown = page.eval("document.getElementById('run').dataset.runId").await.as_str().unwrap().to_string();
    page.click("[data-policy=\"web-demo\"] [data-action=restore]").await;
    page.wait_for(&is_visible("restore-form"), 10, "the restore form").await;
    page.click("#restore-inplace").await;
    page.type_into("#restore-confirm", "web-demo").await;
    page.click("#restore-submit").await;
    page.wait_for(
        &format!("(() => {{ const r = document.getElementById('run'); return r.dataset.runId !== {shown:?} && r.dataset.state === 'succeeded'; }})()"),
        60,
        "the in-place restore to succeed",
    )
    .await;
    assert_eq!(std::fs::read(source.join("hello.txt")).unwrap(), b"hello from the web page\n", "restored in place");

    // A phone: the same page, reloaded; the session cookie keeps the login,
    // and nothing needs scrolling sideways.
    page.viewport(390, 844, true).await;
    page.call("Page.reload", json!({})).await;
    page.wait_for("!!document.querySelector('[data-policy=\"web-demo\"]')", 15, "the page on a phone").await;
    page.wait_for("document.readyState === 'complete'", 10, "the page to load").await;
    let fits = page.eval("document.documentElement.scrollWidth <= window.innerWidth").await;
    let widths = page.eval("[document.documentElement.scrollWidth, window.innerWidth]").await;
    assert_eq!(fits, json!(true), "no sideways scrolling on a phone: {widths}");
    page.screenshot("page-phone.png").await;

    // Logging out ends the session: the form again, even after a reload.
    page.click("#logout").await;
    page.wait_for(&is_visible("login-form"), 10, "the login form after logout").await;
    page.call("Page.reload", json!({})).await;
    page.wait_for(&is_visible("login-form"), 10, "the login form after a reload").await;
    eprintln!("browser part took {:?}", started.elapsed());
    assert!(!agent.log_text().contains(&agent.token), "the token is never logged");
}

/// The `Set-Cookie` of a login, and the session's CSRF token.
async fn login(client: &reqwest::Client, url: &str, token: &str) -> (String, String) {
    let r = client.post(format!("{url}/ui/login")).json(&json!({"token": token})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()[reqwest::header::SET_COOKIE].to_str().unwrap().to_string();
    let body: Value = r.json().await.unwrap();
    (cookie, body["csrfToken"].as_str().unwrap().to_string())
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_cookie_is_httponly_strict_and_changes_need_the_csrf_token() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(&tmp.path().join("state"), &[]).unwrap();
    let c = reqwest::Client::new();
    let url = &agent.url;

    // The page itself: served without login, locked down by its headers.
    let r = c.get(format!("{url}/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    let csp = h["content-security-policy"].to_str().unwrap();
    for part in ["default-src 'self'", "script-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    let html = r.text().await.unwrap();
    assert!(html.contains("<form id=\"login-form\"") && html.contains("name=\"viewport\""));
    assert!(!html.contains("<script>"), "no inline script");
    assert_eq!(c.get(format!("{url}/ui/session")).send().await.unwrap().status(), 401);
    let (st, v) = agent.call("GET", "/v1/cluster", None).await;
    assert_eq!((st, v["error"]["code"].as_str()), (409, Some("kubernetes_off")), "{v}");
    assert_eq!(c.get(format!("{url}/v1/policies")).send().await.unwrap().status(), 401, "/v1 without a token");

    // A wrong token: 401 with a message that says what to do.
    let r = c.post(format!("{url}/ui/login")).json(&json!({"token": "wrong"})).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "wrong_token");
    assert!(v["error"]["message"].as_str().unwrap().contains("token file"), "{v}");
    // Logging in from another site is refused outright.
    let r = c
        .post(format!("{url}/ui/login"))
        .header("Origin", "https://evil.example")
        .json(&json!({"token": agent.token}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let (set_cookie, csrf) = login(&c, url, &agent.token).await;
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(flag), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: no Secure flag ({set_cookie})");
    assert!(!set_cookie.contains(&agent.token), "the cookie does not hold the token");
    let cookie = cookie_pair(&set_cookie);

    // Reads with the cookie alone.
    let r = c.get(format!("{url}/v1/policies")).header("Cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A cross-site POST carries the cookie but cannot know the CSRF token.
    for csrf_header in [None, Some("0000"), Some("")] {
        let mut req = c
            .post(format!("{url}/v1/policies/no-such/run"))
            .header("Cookie", &cookie)
            .header("Origin", "https://evil.example");
        if let Some(v) = csrf_header {
            req = req.header("X-CSRF-Token", v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403, "CSRF header {csrf_header:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "csrf_token_missing");
    }
    // The page's own request, with the token: through to the handler.
    let r = c
        .post(format!("{url}/v1/policies/no-such/run"))
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "past the guard, to the handler");
    // A wrong bearer token is refused even with a good cookie; the right one
    // works as before, without any cookie.
    let r = c.get(format!("{url}/v1/policies")).header("Cookie", &cookie).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let (st, _) = agent.call("POST", "/v1/policies/no-such/run", None).await;
    assert_eq!(st, 404, "bearer clients need no CSRF token");

    // Logout needs the CSRF token too, and ends the session.
    let r = c.post(format!("{url}/ui/logout")).header("Cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .post(format!("{url}/ui/logout"))
        .header("Cookie", &cookie)
        .header("X-CSRF-Token", &csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(r.headers()[reqwest::header::SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    assert_eq!(c.get(format!("{url}/v1/policies")).header("Cookie", &cookie).send().await.unwrap().status(), 401);

    // Rotating the token ends the sessions made with the old one.
    let (set_cookie, _) = login(&c, url, &agent.token).await;
    let cookie = cookie_pair(&set_cookie);
    assert_eq!(c.get(format!("{url}/ui/session")).header("Cookie", &cookie).send().await.unwrap().status(), 200);
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(agent.state_dir.join("token"), "rotated-token\n").unwrap();
    assert_eq!(c.get(format!("{url}/v1/policies")).header("Cookie", &cookie).send().await.unwrap().status(), 401);
    assert_eq!(c.get(format!("{url}/ui/session")).header("Cookie", &cookie).send().await.unwrap().status(), 401);
    assert!(!agent.log_text().contains(&agent.token), "the token is never logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_the_session_cookie_is_also_secure() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, cert, key) = crate::tls::ca_and_leaf(tmp.path(), "page");
    let agent = AgentProc::start(
        &tmp.path().join("state"),
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    )
    .unwrap();
    assert!(agent.url.starts_with("https://"), "{}", agent.url);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    let c = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let (set_cookie, _) = login(&c, &agent.url, &agent.token).await;
    for flag in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(set_cookie.contains(flag), "{set_cookie}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_kubernetes_on_the_agent_and_its_page_show_the_cluster_view() {
    let c = Cluster::new().await;
    let mut a = c.node("node-a");
    c.csi_claim(&mut a, "on-a", json!({"soda-syncer.io/backup": "true", "soda-syncer.io/secret": "repo-keys"}));
    c.csi_claim(&mut a, "plain", json!({}));
    c.start(&mut a);
    eventually(90, "the first backup of on-a", || {
        (c.pvc("on-a")["metadata"]["annotations"]["soda-syncer.io/last-backup-state"] == "succeeded").then_some(())
    })
    .await;
    let agent = a.agent.as_ref().unwrap();

    // The endpoint answers what `soda-syncer cluster` answers.
    let mut from_agent = agent.get("/v1/cluster").await;
    let out = Command::new(crate::support::BIN)
        .args(["cluster", "-o", "json", "--kubeconfig"])
        .arg(&c.kubeconfig)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let mut from_cli: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    // Times of reading and of Lease renewals differ between the two reads.
    for v in [&mut from_agent, &mut from_cli] {
        v.as_object_mut().unwrap().remove("at");
        for a in v["agents"].as_array_mut().unwrap() {
            a.as_object_mut().unwrap().remove("renewedAt");
        }
    }
    assert_eq!(from_agent, from_cli);
    assert_eq!(from_agent["summary"]["claims"], 2, "{from_agent}");
    // And through the agent, for a machine with no kubeconfig.
    let out = Command::new(crate::support::BIN)
        .args(["--server", &agent.url, "--token", &agent.token, "cluster", "--via-agent", "-o", "json"])
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    let mut via_agent: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    via_agent.as_object_mut().unwrap().remove("at");
    for a in via_agent["agents"].as_array_mut().unwrap() {
        a.as_object_mut().unwrap().remove("renewedAt");
    }
    assert_eq!(via_agent, from_agent);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("2 claims protected")
            || String::from_utf8_lossy(&out.stderr).contains("of 2 claims"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, v) = agent.call("GET", "/v1/cluster?namespace=elsewhere", None).await;
    assert_eq!((st, v["summary"]["claims"].as_u64()), (200, Some(0)), "{v}");
    let (st, v) = agent.call("GET", "/v1/cluster?nope=1", None).await;
    assert_eq!((st, v["error"]["code"].as_str()), (400, Some("invalid_query")), "{v}");
    let (st, _) = agent.call_with_token("GET", "/v1/cluster", None, None).await;
    assert_eq!(st, 401);

    // The page shows it.
    let browser = Chromium::start();
    let mut page = browser.page().await;
    page.viewport(1280, 900, false).await;
    page.call("Page.navigate", json!({"url": format!("{}/", agent.url)})).await;
    page.wait_for(&is_visible("login-form"), 15, "the login form").await;
    log_in(&mut page, agent).await;
    page.wait_for(&is_visible("cluster"), 10, "the cluster view").await;
    page.wait_for(
        "!!document.querySelector('[data-claim=\"app/on-a\"][data-protected=true]')",
        10,
        "the protected claim",
    )
    .await;
    let plain = page.eval("document.querySelector('[data-claim=\"app/plain\"]').textContent").await;
    assert!(plain.as_str().unwrap().contains("not opted in"), "{plain}");
    let summary = page.eval("document.getElementById('cluster-summary').textContent").await;
    assert_eq!(summary, json!("1 of 2 claims protected, 0 overdue, 0 failing, 1 unprotected"));
    page.eval("document.getElementById('cluster').scrollIntoView()").await;
    page.screenshot("page-cluster.png").await;
    page.viewport(390, 844, true).await;
    let fits = page.eval("document.documentElement.scrollWidth <= window.innerWidth").await;
    assert_eq!(fits, json!(true), "the claims table scrolls inside its box on a phone, not the page");
}

//! Real object-storage servers on loopback for integration tests.
//!
//! - [`RcloneRest`]: `rclone serve restic` (restic REST protocol, real basic
//!   auth, data in a directory the test owns; survives a restart).
//! - [`MotoS3`]: `moto_server` (S3, in memory, accepts any key).
//! - [`RestServer`]: restic's own `rest-server` (htpasswd users, optionally
//!   `--append-only`), from scripts/install-deps' cache.
//!
//! rclone and rest-server can serve a directory `--append-only`; a second
//! process over the same directory without it is the maintainer's endpoint.
//!
//! Both bind 127.0.0.1 with port 0 and parse the port they report. Their
//! output is drained by background threads so the children never block on a
//! full pipe; the collected text is included in startup errors.
//!
//! Only std, anyhow and tempfile are used so this file can be included as
//! `mod servers;` from any integration-test crate.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const RCLONE_START_DEADLINE: Duration = Duration::from_secs(20);
const RCLONE_REBIND_DEADLINE: Duration = Duration::from_secs(10);
const MOTO_START_DEADLINE: Duration = Duration::from_secs(60);

/// The full path of `bin` if it is an executable file on `PATH`.
pub fn which(bin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false);
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(bin)).find(|p| is_exec(p))
}

/// A random alphanumeric string of `len` characters, from /dev/urandom.
pub fn random_alnum(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut urandom = File::open("/dev/urandom").expect("open /dev/urandom");
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        urandom.read_exact(&mut buf).expect("read /dev/urandom");
        for &b in &buf {
            // 248 = 4 * 62: reject the tail so every character is equally likely.
            if b < 248 && out.len() < len {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// Output lines of a child, forwarded from drain threads. `None` marks the end
/// of one stream (the child closed it, normally because it exited).
struct Output {
    rx: Receiver<Option<String>>,
    open_streams: usize,
    seen: Arc<Mutex<String>>,
}

impl Output {
    /// Start one drain thread per stream. Each thread keeps reading until EOF
    /// (so the child never blocks), records every line in `seen`, and forwards
    /// it while somebody listens.
    fn drain(streams: Vec<Box<dyn Read + Send>>) -> Self {
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(String::new()));
        let open_streams = streams.len();
        for stream in streams {
            let tx: Sender<Option<String>> = tx.clone();
            let seen = Arc::clone(&seen);
            thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut raw = Vec::new();
                loop {
                    raw.clear();
                    match reader.read_until(b'\n', &mut raw) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                            if let Ok(mut s) = seen.lock() {
                                // Keep memory bounded for chatty servers.
                                if s.len() < 64 * 1024 {
                                    s.push_str(&line);
                                    s.push('\n');
                                }
                            }
                            let _ = tx.send(Some(line));
                        }
                    }
                }
                let _ = tx.send(None);
            });
        }
        Output { rx, open_streams, seen }
    }

    /// Wait for the first line for which `find` returns `Some`, until
    /// `deadline`. Errors when the deadline passes or every stream closes.
    fn wait_for<T>(&mut self, deadline: Instant, find: impl Fn(&str) -> Option<T>) -> Result<T> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out; output so far:\n{}", self.seen());
            }
            match self.rx.recv_timeout(left) {
                Ok(Some(line)) => {
                    if let Some(v) = find(&line) {
                        return Ok(v);
                    }
                }
                Ok(None) => {
                    self.open_streams -= 1;
                    if self.open_streams == 0 {
                        bail!("the server closed its output; output:\n{}", self.seen());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("timed out; output so far:\n{}", self.seen());
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the server closed its output; output:\n{}", self.seen());
                }
            }
        }
    }

    fn seen(&self) -> String {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// The port in the first `http://127.0.0.1:N` of `line`.
fn port_after_loopback_url(line: &str, marker: &str) -> Option<u16> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let rest = rest.strip_prefix("http://127.0.0.1:")?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok().filter(|&p| p != 0)
}

fn kill_and_wait(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // Kill exactly this child (by its own pid) and reap it.
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `rclone serve restic` on 127.0.0.1 with basic auth.
pub struct RcloneRest {
    child: Option<Child>,
    data_dir: PathBuf,
    port: u16,
    user: String,
    pass: String,
    output: Option<Output>,
    append_only: bool,
}

impl RcloneRest {
    /// Serve `data_dir` (created if missing) on a free loopback port.
    pub fn start(data_dir: &Path) -> Result<Self> {
        Self::start_with(data_dir, false)
    }

    /// As `start`, with `--append-only`: rclone then refuses (403) every
    /// DELETE except of lock files.
    pub fn start_append_only(data_dir: &Path) -> Result<Self> {
        Self::start_with(data_dir, true)
    }

    fn start_with(data_dir: &Path, append_only: bool) -> Result<Self> {
        std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
        let mut s = RcloneRest {
            child: None,
            data_dir: data_dir.to_path_buf(),
            port: 0,
            user: random_alnum(16),
            pass: random_alnum(16),
            output: None,
            append_only,
        };
        s.spawn_once("127.0.0.1:0", Instant::now() + RCLONE_START_DEADLINE)?;
        Ok(s)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn pass(&self) -> &str {
        &self.pass
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// `http://127.0.0.1:N` (no credentials).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The restic repository URL for repository `name`:
    /// `rest:http://U:P@127.0.0.1:N/<name>/`.
    pub fn url(&self, name: &str) -> String {
        format!("rest:http://{}:{}@127.0.0.1:{}/{}/", self.user, self.pass, self.port, name)
    }

    /// Whether the server process is running (not stopped, not exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kill the server and wait for it. Idempotent.
    pub fn stop(&mut self) {
        kill_and_wait(&mut self.child);
        self.output = None;
    }

    /// Stop (if running), then serve the same directory again on the same
    /// port with the same credentials. Retries while the port is still busy.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + RCLONE_REBIND_DEADLINE;
        loop {
            match self.spawn_once(&addr, Instant::now() + RCLONE_START_DEADLINE) {
                Ok(()) => return Ok(()),
                // Most likely "address already in use": try again shortly.
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(200)),
                Err(e) => return Err(e.context(format!("restart rclone serve restic on {addr}"))),
            }
        }
    }

    fn spawn_once(&mut self, addr: &str, deadline: Instant) -> Result<()> {
        let mut child = Command::new("rclone")
            .args(["serve", "restic", "--config", "/dev/null", "--addr", addr])
            .arg("--user")
            .arg(&self.user)
            .arg("--pass")
            .arg(&self.pass)
            .args(if self.append_only { &["--append-only"][..] } else { &[][..] })
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn `rclone serve restic` (is rclone installed?)")?;
        let stderr = child.stderr.take().expect("piped stderr");
        self.child = Some(child);
        let mut output = Output::drain(vec![Box::new(stderr)]);
        let found = output.wait_for(deadline, |line| port_after_loopback_url(line, "Serving restic REST API on "));
        self.output = Some(output);
        match found {
            Ok(port) => {
                self.port = port;
                Ok(())
            }
            Err(e) => {
                // Kill it if it hangs, reap it if it died.
                self.stop();
                Err(e.context(format!("`rclone serve restic --addr {addr}` did not report its address")))
            }
        }
    }
}

impl Drop for RcloneRest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `moto_server` (S3, in memory) on 127.0.0.1.
pub struct MotoS3 {
    child: Option<Child>,
    port: u16,
    output: Option<Output>,
}

impl MotoS3 {
    /// Start moto on a free loopback port. Takes a few seconds (Python).
    pub fn start() -> Result<Self> {
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", "0"])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn `moto_server` (pip install 'moto[s3,server]')")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut output = Output::drain(vec![Box::new(stderr), Box::new(stdout)]);
        let found =
            output.wait_for(Instant::now() + MOTO_START_DEADLINE, |line| port_after_loopback_url(line, "Running on "));
        match found {
            Ok(port) => Ok(MotoS3 { child: Some(child), port, output: Some(output) }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context("`moto_server -H 127.0.0.1 -p 0` did not report its address"))
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:N`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The restic repository URL `s3:http://127.0.0.1:N/<bucket>/repo`.
    /// `restic init` creates the bucket.
    pub fn repo_url(&self, bucket: &str) -> String {
        format!("s3:{}/{}/repo", self.endpoint(), bucket)
    }

    /// Credentials for the restic child (moto accepts any).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".to_string(), "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), "testing".to_string()),
        ]
    }

    /// Kill the server and wait for it. Idempotent. Its data is lost.
    pub fn stop(&mut self) {
        kill_and_wait(&mut self.child);
        self.output = None;
    }
}

impl Drop for MotoS3 {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where scripts/install-deps puts rest-server.
pub fn rest_server_bin() -> PathBuf {
    let dir = std::env::var_os("SODA_SYNCER_REST_SERVER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/soda-syncer-test/rest-server"));
    dir.join("rest-server")
}

/// restic's `rest-server` on 127.0.0.1 with one htpasswd user.
pub struct RestServer {
    child: Option<Child>,
    port: u16,
    user: String,
    pass: String,
    _output: Option<Output>,
    _htpasswd: tempfile::TempDir,
}

impl RestServer {
    /// Serve `data_dir` (created if missing), `--append-only` or not, with a
    /// user of its own (an htpasswd file outside the data directory, so two
    /// servers over one directory have different users).
    pub fn start(data_dir: &Path, append_only: bool) -> Result<Self> {
        let bin = rest_server_bin();
        if !bin.exists() {
            bail!("{} is missing: run scripts/install-deps", bin.display());
        }
        std::fs::create_dir_all(data_dir)?;
        let (user, pass) = (random_alnum(12), random_alnum(16));
        let htpasswd = tempfile::tempdir()?;
        let file = htpasswd.path().join("htpasswd");
        // `{SHA}` is one of the hash formats rest-server's htpasswd reader takes.
        std::fs::write(&file, format!("{user}:{{SHA}}{}\n", sha1_base64(pass.as_bytes())))?;
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0", "--htpasswd-file"])
            .arg(&file)
            .arg("--path")
            .arg(data_dir)
            .args(if append_only { &["--append-only"][..] } else { &[][..] })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut output = Output::drain(vec![
            Box::new(child.stdout.take().expect("piped")),
            Box::new(child.stderr.take().expect("piped")),
        ]);
        let found = output.wait_for(Instant::now() + RCLONE_START_DEADLINE, |line| {
            let rest = line.split("start server on 127.0.0.1:").nth(1)?;
            rest.trim().parse::<u16>().ok().filter(|&p| p != 0)
        });
        match found {
            Ok(port) => {
                Ok(RestServer { child: Some(child), port, user, pass, _output: Some(output), _htpasswd: htpasswd })
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context("rest-server did not report its address"))
            }
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `rest:http://U:P@127.0.0.1:N/<name>/`.
    pub fn url(&self, name: &str) -> String {
        format!("rest:http://{}:{}@127.0.0.1:{}/{}/", self.user, self.pass, self.port, name)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn pass(&self) -> &str {
        &self.pass
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        kill_and_wait(&mut self.child);
    }
}

/// SHA-1 (FIPS 180-1) in base64: for rest-server's `{SHA}` htpasswd lines
/// (test-only credentials; no crate for it in the test binary).
fn sha1_base64(data: &[u8]) -> String {
    let (mut h0, mut h1, mut h2, mut h3, mut h4) =
        (0x67452301u32, 0xEFCDAB89u32, 0x98BADCFEu32, 0x10325476u32, 0xC3D2E1F0u32);
    let mut msg = data.to_vec();
    let bits = (data.len() as u64) * 8;
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([chunk[4 * i], chunk[4 * i + 1], chunk[4 * i + 2], chunk[4 * i + 3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let (mut a, mut b, mut c, mut d, mut e) = (h0, h1, h2, h3, h4);
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*wi);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        h0 = h0.wrapping_add(a);
        h1 = h1.wrapping_add(b);
        h2 = h2.wrapping_add(c);
        h3 = h3.wrapping_add(d);
        h4 = h4.wrapping_add(e);
    }
    let mut digest = Vec::with_capacity(20);
    for h in [h0, h1, h2, h3, h4] {
        digest.extend_from_slice(&h.to_be_bytes());
    }
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in digest.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

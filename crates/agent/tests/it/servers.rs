//! Real object-storage servers on loopback for integration tests.
//!
//! - [`RcloneRest`]: `rclone serve restic` (restic REST protocol, real basic
//!   auth, data in a directory the test owns; survives a restart).
//! - [`MotoS3`]: `moto_server` (S3, in memory, accepts any key).
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
}

impl RcloneRest {
    /// Serve `data_dir` (created if missing) on a free loopback port.
    pub fn start(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
        let mut s = RcloneRest {
            child: None,
            data_dir: data_dir.to_path_buf(),
            port: 0,
            user: random_alnum(16),
            pass: random_alnum(16),
            output: None,
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

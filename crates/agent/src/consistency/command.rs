//! Running a helper program (btrfs, losetup, mount, umount, the lvm tools)
//! or a policy's hook to the end, blocking: an argv (never a shell), a
//! cleared environment, null stdin, its own process group, a parent-death
//! signal, the output kept in bounded buffers, and a timeout and a
//! cancellation that kill the whole group.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How a command ended, if not with exit code 0.
#[derive(Debug)]
pub enum CommandFailure {
    /// It could not be started (not installed, not executable).
    Spawn(std::io::Error),
    TimedOut,
    Cancelled,
    /// It exited non-zero (or was killed by a signal: code -1).
    Exit {
        code: i32,
        output: String,
    },
}

impl CommandFailure {
    /// A sentence about what happened, with the end of its output.
    pub fn describe(&self, timeout: Duration) -> String {
        match self {
            CommandFailure::Spawn(e) => format!("could not be started: {e}"),
            CommandFailure::TimedOut => format!("did not finish within {} s and was killed", timeout.as_secs()),
            CommandFailure::Cancelled => "was stopped because the run was cancelled".into(),
            CommandFailure::Exit { code, output } if output.is_empty() => format!("exited with code {code}"),
            CommandFailure::Exit { code, output } => format!("exited with code {code}: {output}"),
        }
    }
}

/// Keep at most this much of a command's output (its end).
const OUTPUT_TAIL: usize = 2000;

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut keep = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            keep.extend_from_slice(&buf[..n]);
            if keep.len() > 2 * OUTPUT_TAIL {
                keep.drain(..keep.len() - OUTPUT_TAIL);
            }
        }
        keep
    })
}

fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.len().saturating_sub(OUTPUT_TAIL);
    let start = (start..=s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
    s[start..].replace('\n', " | ")
}

/// The search path helper programs are found on.
pub fn search_path() -> String {
    std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())
}

/// Run `argv` to the end. Returns its stdout on exit code 0.
pub fn run(
    argv: &[OsString],
    env: &[(String, String)],
    timeout: Duration,
    cancel: Option<&CancellationToken>,
) -> Result<String, CommandFailure> {
    let (exe, args) = argv
        .split_first()
        .ok_or_else(|| CommandFailure::Spawn(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty argv")))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env_clear()
        .env("PATH", search_path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        // Hooks and tools start in /, never in a directory a workload
        // controls (the agent's own working directory may be anything).
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe and only affects the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(CommandFailure::Spawn)?;
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let started = Instant::now();
    let mut wait = Duration::from_millis(1);
    let ended = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(CommandFailure::Spawn(e)),
        }
        if cancel.is_some_and(|c| c.is_cancelled()) {
            break Err(CommandFailure::Cancelled);
        }
        if started.elapsed() > timeout {
            break Err(CommandFailure::TimedOut);
        }
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(20));
    };
    if ended.is_err() {
        kill_group(&mut child);
    }
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let status = ended?;
    if status.success() {
        Ok(String::from_utf8_lossy(&stdout).into_owned())
    } else {
        let mut output = tail(&stderr);
        if output.is_empty() {
            output = tail(&stdout);
        }
        Err(CommandFailure::Exit { code: status.code().unwrap_or(-1), output })
    }
}

/// SIGTERM to the group, SIGKILL after two seconds.
fn kill_group(child: &mut std::process::Child) {
    let pgid = -(child.id() as i32);
    // SAFETY: signals only the process group we created for this child.
    unsafe { libc::kill(pgid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            // The leader is gone; anything it left in the group goes too.
            // SAFETY: as above.
            unsafe { libc::kill(pgid, libc::SIGKILL) };
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pgid, libc::SIGKILL) };
    let _ = child.wait();
}

/// Shorthand for the helper tools: argv from string-likes.
pub fn argv<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    items.into_iter().map(Into::into).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_runs_without_a_shell_and_reports_its_exit() {
        let out = run(&argv(["/bin/echo", "a;b $(x)"]), &[], Duration::from_secs(5), None).unwrap();
        assert_eq!(out, "a;b $(x)\n");
        match run(&argv(["/bin/ls", "/does/not/exist"]), &[], Duration::from_secs(5), None) {
            Err(CommandFailure::Exit { code, output }) => {
                assert_eq!(code, 2);
                assert!(output.contains("does/not/exist"), "{output}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run(&argv(["/no/such/tool"]), &[], Duration::from_secs(5), None),
            Err(CommandFailure::Spawn(_))
        ));
    }

    #[test]
    fn a_command_past_its_timeout_or_cancelled_is_killed() {
        let t = Instant::now();
        let r = run(&argv(["/bin/sleep", "30"]), &[], Duration::from_millis(200), None);
        assert!(matches!(r, Err(CommandFailure::TimedOut)), "{r:?}");
        let token = CancellationToken::new();
        token.cancel();
        let r = run(&argv(["/bin/sleep", "30"]), &[], Duration::from_secs(30), Some(&token));
        assert!(matches!(r, Err(CommandFailure::Cancelled)), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn only_the_given_environment_reaches_the_command() {
        let out = run(&argv(["/usr/bin/env"]), &[("SODA_X".into(), "1".into())], Duration::from_secs(5), None).unwrap();
        let keys: Vec<&str> = out.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
        assert_eq!(keys, ["PATH", "SODA_X"], "{out}");
    }
}

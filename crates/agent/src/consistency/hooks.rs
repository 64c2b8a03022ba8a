//! A policy's `pre` and `post` hooks: argv arrays run directly (no shell,
//! no PATH lookup: absolute, operator-allowed executables), with a timeout,
//! a cleared environment naming the policy and volume, and their output kept
//! for the error message.

use std::ffi::OsString;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::command::{self, CommandFailure};
use super::ConsistencyError;

#[derive(Debug, Clone)]
pub struct HookRunner {
    pub pre: Vec<Vec<String>>,
    pub post: Vec<Vec<String>>,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
}

fn shown(argv: &[String]) -> String {
    let s = argv.join(" ");
    if s.len() > 200 {
        let cut = (0..=200).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        format!("{}…", &s[..cut])
    } else {
        s
    }
}

impl HookRunner {
    pub fn is_empty(&self) -> bool {
        self.pre.is_empty() && self.post.is_empty()
    }

    fn run_one(&self, phase: &str, argv: &[String], cancel: Option<&CancellationToken>) -> Result<(), String> {
        let mut env = self.env.clone();
        env.push(("SODA_SYNCER_HOOK".into(), phase.into()));
        let args: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let started = Instant::now();
        let result = command::run(&args, &env, self.timeout, cancel);
        let ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(_) => {
                tracing::info!(phase, hook = %shown(argv), ms, "hook succeeded");
                Ok(())
            }
            Err(CommandFailure::Cancelled) => Err("cancelled".into()),
            Err(f) => {
                let why = f.describe(self.timeout);
                tracing::error!(phase, hook = %shown(argv), ms, error = %why, "hook failed");
                Err(why)
            }
        }
    }

    /// Run the pre hooks in order; the first failure stops them.
    pub fn run_pre(&self, cancel: &CancellationToken) -> Result<(), ConsistencyError> {
        for argv in &self.pre {
            if cancel.is_cancelled() {
                return Err(ConsistencyError::Cancelled);
            }
            self.run_one("pre", argv, Some(cancel)).map_err(|message| {
                if cancel.is_cancelled() {
                    ConsistencyError::Cancelled
                } else {
                    ConsistencyError::PreHook { hook: shown(argv), message }
                }
            })?;
        }
        Ok(())
    }

    /// Run every post hook, even after one failed (each may undo something
    /// of its own); not cancellable: they undo what `pre` did. Returns the
    /// first failure.
    pub fn run_post(&self) -> Result<(), ConsistencyError> {
        let mut first = None;
        for argv in &self.post {
            if let Err(message) = self.run_one("post", argv, None) {
                first.get_or_insert(ConsistencyError::PostHook { hook: shown(argv), message });
            }
        }
        first.map_or(Ok(()), Err)
    }
}

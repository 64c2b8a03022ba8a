//! `kube-standin [--port N] [--objects FILE.json]`: serve the Kubernetes API
//! server stand-in on 127.0.0.1 until killed. FILE is a JSON array of
//! objects or a List (`{"items": [...]}`), stored one by one as it is
//! parsed (30,000 objects never sit in memory as `Value`s at once). Prints only
//! `listening on http://127.0.0.1:N` on stdout; errors go to stderr.

use std::fmt;
use std::io::Write;
use std::process::ExitCode;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use soda_syncer_standin::kube::{KubeStandin, KubeStandinOptions};

/// Applies each element of the array (or of a List's `items`) as it is parsed.
struct Loader<'a>(&'a KubeStandin);

impl<'de> DeserializeSeed<'de> for Loader<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Loader<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON array of objects or a List")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(obj) = seq.next_element::<Value>()? {
            self.0.apply_all([obj]).map_err(serde::de::Error::custom)?;
            n += 1;
        }
        Ok(n)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let mut n = 0;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "items" => n = map.next_value_seed(Loader(self.0))?,
                _ => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        Ok(n)
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("kube-standin: {msg}\nusage: kube-standin [--port N] [--objects FILE.json]");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut opts = KubeStandinOptions::default();
    let mut objects = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--port", Some(p)) => match p.parse() {
                Ok(p) => opts.port = p,
                Err(_) => return usage(&format!("bad port {p:?}")),
            },
            ("--objects", Some(f)) => objects = Some(f),
            _ => return usage(&format!("unexpected argument {arg:?}")),
        }
    }
    let standin = KubeStandin::start_with(opts).await;
    if let Some(path) = objects {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => return usage(&format!("{path}: {e}")),
        };
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        if let Err(e) = Loader(&standin).deserialize(&mut de) {
            eprintln!("kube-standin: {path}: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("listening on {}", standin.url());
    let _ = std::io::stdout().flush();
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}

//! HTTPS with the real binary: a certificate from files, the CLI verifying
//! it against a CA file, plain HTTP refused, and a rotated certificate
//! picked up without a restart. Certificates come from the real `openssl`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::{AgentProc, BIN};

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a server certificate for 127.0.0.1 signed by it:
/// (CA certificate, server certificate, server key).
pub(crate) fn ca_and_leaf(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let (ca_crt, ca_key) = (format!("{name}-ca.crt"), format!("{name}-ca.key"));
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    a.extend(["-keyout", &ca_key, "-out", &ca_crt]);
    openssl(&a, dir);
    let (crt, key, csr, ext) =
        (format!("{name}.crt"), format!("{name}.key"), format!("{name}.csr"), format!("{name}.ext"));
    let mut b = vec!["req"];
    b.extend(ec);
    b.extend(["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &csr]);
    openssl(&b, dir);
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
        dir,
    );
    (dir.join(ca_crt), dir.join(crt), dir.join(key))
}

fn cli(agent: &AgentProc, ca: Option<&Path>) -> (Option<i32>, String) {
    let mut c = Command::new(BIN);
    c.args(["--server", &agent.url, "--agent-state-dir"]).arg(&agent.state_dir);
    if let Some(ca) = ca {
        c.arg("--ca-file").arg(ca);
    }
    let out = c.args(["policy", "list", "-o", "json"]).output().unwrap();
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_serves_https_and_rotates_its_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca_a, cert_a, key_a) = ca_and_leaf(tmp.path(), "first");
    let (served_cert, served_key) = (tmp.path().join("served.crt"), tmp.path().join("served.key"));
    std::fs::copy(&cert_a, &served_cert).unwrap();
    std::fs::copy(&key_a, &served_key).unwrap();
    let agent = AgentProc::start(
        &tmp.path().join("state"),
        &["--tls-cert", served_cert.to_str().unwrap(), "--tls-key", served_key.to_str().unwrap()],
    )
    .unwrap();
    assert!(agent.url.starts_with("https://127.0.0.1:"), "{}", agent.url);

    let (code, out) = cli(&agent, Some(&ca_a));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"policies\""), "{out}");
    let (code, out) = cli(&agent, None);
    assert_eq!(code, Some(1), "an unknown CA is refused: {out}");
    assert!(out.contains("cannot reach the agent"), "{out}");

    // Plain HTTP to the TLS port gets no API answer.
    let plain = agent.url.replace("https://", "http://");
    let r = reqwest::Client::new().get(format!("{plain}/healthz")).timeout(Duration::from_secs(5)).send().await;
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true), "plain HTTP must not be served");

    // Rotate: a new certificate from another CA, picked up within seconds.
    let (ca_b, cert_b, key_b) = ca_and_leaf(tmp.path(), "second");
    std::fs::copy(&key_b, &served_key).unwrap();
    std::fs::copy(&cert_b, &served_cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out) = cli(&agent, Some(&ca_b));
        if code == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the rotated certificate was not served: {out}\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(agent.log_text().contains("TLS certificate reloaded"));
}

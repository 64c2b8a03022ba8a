//! `--help` texts are part of the interface: snapshot-tested, so a change
//! shows up in review.

use std::process::Command;

use crate::support::BIN;

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).arg("--help").env_clear().env("COLUMNS", "100").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_texts_match_their_snapshots() {
    for cmd in [
        &[][..],
        &["serve"],
        &["policy"],
        &["policy", "create"],
        &["policy", "edit"],
        &["run"],
        &["runs"],
        &["snapshots"],
        &["restore"],
        &["maintenance"],
        &["maintain"],
        &["cluster"],
    ] {
        let name = if cmd.is_empty() { "soda-syncer".to_string() } else { format!("soda-syncer-{}", cmd.join("-")) };
        insta::assert_snapshot!(name, help(cmd));
    }
}

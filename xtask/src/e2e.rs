//! `cargo xtask e2e`: the demo chat in a real browser, and the client helper's unit tests
//! (`e2e/`, Node's test runner).
//!
//! Installs what is missing, where we may: Debian's `chromium` (the tests drive it with
//! playwright-core; no browser is downloaded), Node.js, and the npm packages of
//! `e2e/package-lock.json` (`npm ci`). Builds the `switchboard` binary the tests start.
//! Screenshots land in `e2e/screenshots/`.

use std::path::Path;
use std::process::Command;

use crate::{apt_install, have, run, Result};

const CHROMIUM: &str = "/usr/bin/chromium";

pub(crate) fn run_e2e() -> Result {
    let mut missing = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        missing.push("chromium");
    }
    if !have("node") || !have("npm") {
        missing.extend(["nodejs", "npm"]);
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    // The same build as `cargo xtask test` (which also leaves target/debug/switchboard): a
    // no-op after it, where a plain `cargo build` would unify features differently and
    // rebuild half of the dependencies.
    run(
        "cargo",
        &[
            "test",
            "--workspace",
            "--all-targets",
            "--no-run",
            "--quiet",
        ],
    )?;
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let bin = std::fs::canonicalize(Path::new(&target).join("debug/switchboard"))
        .map_err(|e| format!("the switchboard binary: {e}"))?;
    in_e2e("npm", &["ci", "--no-audit", "--no-fund"], &[])?;
    in_e2e(
        "node",
        &["--test", "--test-concurrency=1"],
        &[
            ("SWITCHBOARD_BIN", bin.to_string_lossy().as_ref()),
            ("CHROMIUM", CHROMIUM),
        ],
    )
}

/// Runs `program` in `e2e/`.
fn in_e2e(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result {
    println!("$ (cd e2e && {program} {})", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir("e2e")
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` in e2e/ failed ({status}); screenshots: e2e/screenshots/",
            args.join(" ")
        ))
    }
}

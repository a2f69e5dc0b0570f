//! `cargo xtask`: the project's maintenance tasks, in Rust so they run wherever cargo does.
//!
//! - `cargo xtask ci`: exactly what CI runs: install missing system tools, then format
//!   check, clippy, the layering check, every test;
//! - `cargo xtask fmt` / `lint` / `test` / `layering`: one step each.

use std::process::{Command, ExitCode};

/// Crates that must not depend on any other switchboard crate.
const LEAVES: &[&str] = &[
    "switchboard-config",
    "switchboard-bus",
    "switchboard-registry",
    "switchboard-transport",
];

fn main() -> ExitCode {
    let task = std::env::args().nth(1).unwrap_or_else(|| "help".into());
    let result = match task.as_str() {
        "ci" => ci(),
        "fmt" => run("cargo", &["fmt", "--all"]),
        "lint" => lint(),
        "test" => test(),
        "layering" => layering(),
        "deps" => install_system_deps(),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 ci        everything CI runs (installs missing system tools first)\n  \
                 fmt       cargo fmt --all\n  \
                 lint      format check and clippy -D warnings\n  \
                 test      every test of the workspace\n  \
                 layering  check that the leaf crates depend on no other switchboard crate\n  \
                 deps      install missing system tools (curl)"
            );
            return if task == "help" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {task}: {e}");
            ExitCode::FAILURE
        }
    }
}

type Result = std::result::Result<(), String>;

fn ci() -> Result {
    install_system_deps()?;
    lint()?;
    layering()?;
    test()
}

fn lint() -> Result {
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )
}

fn test() -> Result {
    run("cargo", &["test", "--workspace", "--all-targets"])?;
    run("cargo", &["test", "--workspace", "--doc"])
}

/// Architecture invariant: config, bus, registry and transport know nothing of each other.
fn layering() -> Result {
    for leaf in LEAVES {
        let out = Command::new("cargo")
            .args(["tree", "-p", leaf, "-e", "normal", "--prefix", "none"])
            .output()
            .map_err(|e| format!("cargo tree: {e}"))?;
        if !out.status.success() {
            return Err(format!("cargo tree -p {leaf} failed"));
        }
        let tree = String::from_utf8_lossy(&out.stdout);
        let bad: Vec<&str> = tree
            .lines()
            .skip(1)
            .filter(|l| l.starts_with("switchboard"))
            .collect();
        if !bad.is_empty() {
            return Err(format!("{leaf} must not depend on {bad:?}"));
        }
        println!("layering: {leaf} depends on no other switchboard crate");
    }
    Ok(())
}

/// The tests use curl (the spec's handshake). Install it where it is missing and we may.
fn install_system_deps() -> Result {
    let missing: Vec<&str> = ["curl"].into_iter().filter(|tool| !have(tool)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {missing:?}");
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut full: Vec<&str> = sudo.to_vec();
        full.extend_from_slice(args);
        run(full[0], &full[1..])
    };
    apt(&["apt-get", "update", "-qq"])?;
    let mut install = vec!["apt-get", "install", "-y", "-qq"];
    install.extend(missing);
    apt(&install)
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn run(program: &str, args: &[&str]) -> Result {
    println!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

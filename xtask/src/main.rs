//! `cargo xtask`: the project's maintenance tasks, in Rust so they run wherever cargo does.
//!
//! - `cargo xtask ci`: exactly what CI runs: install missing system tools, then format
//!   check, clippy, the layering check, every test;
//! - `cargo xtask fmt` / `lint` / `test` / `layering`: one step each;
//! - `cargo xtask autobahn`: the Autobahn|Testsuite cases 1-11 (via `kosoku`) against the
//!   transport's echo example; fails on any FAILED case.
//! - `cargo xtask codegen`: regenerate `docs/CONFIG.md` from the config schema (`--check`:
//!   only fail when it is stale; a test does the same);
//! - `cargo xtask e2e`: the demo chat in headless Chromium and the client helper's unit tests
//!   (`e2e/`); installs Debian's chromium when missing. Part of `ci`.

use std::process::{Command, ExitCode};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod bench;
mod codegen;
mod e2e;
mod fuzz;
mod layering;

/// The project's maintenance tasks.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

/// One task each.
#[derive(Debug, Subcommand)]
enum Task {
    /// Everything CI runs (installs missing system tools first)
    Ci,
    /// cargo fmt --all
    Fmt,
    /// Format check and clippy -D warnings
    Lint,
    /// Every test of the workspace
    Test,
    /// Check which workspace crate depends on which (cargo metadata)
    Layering,
    /// Autobahn cases 1-11 against the echo example (installs kosoku)
    Autobahn,
    /// Regenerate docs/CONFIG.md from the schema (--check: fail if stale)
    Codegen(codegen::Args),
    /// The demo chat in headless Chromium + client unit tests (installs chromium)
    E2e,
    /// Fuzz targets: [TARGET] [--seconds N] [--asan] (default all, 60 s)
    Fuzz(fuzz::Args),
    /// Load benchmark vs ws-node and uws-node (--smoke: CI's; --help)
    Bench(Box<bench::Args>),
    /// User-space instructions per frame the bench server sends, counted by callgrind: the
    /// figure to compare two builds by (--help)
    Instructions(bench::InstructionsArgs),
    /// Install missing system tools (curl)
    Deps,
}

/// The directory `cargo xtask` was called from, before `main` moved to the workspace root.
static CALLER_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// A path the user typed, as they meant it: a relative one is taken from the directory they
/// called `cargo xtask` from, not from the workspace root that the tasks run in. Made
/// absolute, so that a bare file name is not looked up in `PATH` when it is run.
pub(crate) fn users_path(path: &std::path::Path) -> std::path::PathBuf {
    match CALLER_DIR.get() {
        Some(dir) => dir.join(path),
        None => std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
    }
}

fn main() -> ExitCode {
    if let Ok(dir) = std::env::current_dir() {
        let _ = CALLER_DIR.set(dir);
    }
    // Run from the workspace root whatever the caller's directory.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace");
    if let Err(e) = std::env::set_current_dir(root) {
        eprintln!("xtask: cannot enter {}: {e}", root.display());
        return ExitCode::FAILURE;
    }
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let Some(task) = cli.task else {
        // `cargo xtask` alone: the help, as `cargo xtask help` prints it.
        let _ = Cli::command().print_help();
        return ExitCode::SUCCESS;
    };
    let result = match task {
        Task::Ci => ci(),
        Task::Fmt => run("cargo", &["fmt", "--all"]),
        Task::Lint => lint(),
        Task::Test => test(),
        Task::Layering => layering(),
        Task::Deps => install_system_deps(),
        Task::Autobahn => autobahn(),
        Task::Codegen(args) => codegen::run(&args),
        Task::E2e => e2e::run_e2e(),
        Task::Fuzz(args) => fuzz::fuzz(&args),
        // The report quotes the command's words as given.
        Task::Bench(args) => bench::run(&args, &std::env::args().skip(2).collect::<Vec<_>>()),
        Task::Instructions(args) => bench::instructions(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask {}: {e}", matches.subcommand_name().unwrap_or("?"));
            ExitCode::FAILURE
        }
    }
}

type Result = std::result::Result<(), String>;

fn ci() -> Result {
    install_system_deps()?;
    lint()?;
    layering()?;
    test()?;
    e2e::run_e2e()?;
    autobahn()?;
    bench::ci()
}

/// Runs Autobahn's fuzzingclient cases (sections 1-11; 12 and 13 are compression, which we
/// do not offer) against `examples/echo.rs`. kosoku exits non-zero on any FAILED case.
fn autobahn() -> Result {
    if !have("kosoku") {
        run(
            "python3",
            &["-m", "pip", "install", "--quiet", "kosoku==0.1.0"],
        )?;
    }
    run(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "switchboard-transport",
            "--example",
            "echo",
        ],
    )?;
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let mut echo = Command::new("target/release/examples/echo")
        .args([addr.as_str(), "/"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the echo example: {e}"))?;
    // Wait until it accepts connections (at most 10 s).
    let ready = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::net::TcpStream::connect(&addr).is_ok()
    });
    let outdir = "target/autobahn";
    let result = if ready {
        let _ = std::fs::remove_dir_all(outdir);
        run(
            "kosoku",
            &[
                "-m",
                "fuzzingclient",
                "-o",
                outdir,
                "-x",
                "12.*",
                "-x",
                "13.*",
                &addr,
            ],
        )
    } else {
        Err("the echo example did not start listening".into())
    };
    let _ = echo.kill();
    let _ = echo.wait();
    result?;
    println!("autobahn: {}", summarize_autobahn(outdir)?);
    Ok(())
}

/// "N cases: OK a, NON-STRICT b, ..." from the per-case reports.
fn summarize_autobahn(outdir: &str) -> std::result::Result<String, String> {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    let entries = std::fs::read_dir(outdir).map_err(|e| format!("{outdir}: {e}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.contains("_case_") || !name.ends_with(".json") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some(rest) = text.split("\"behavior\": \"").nth(1) {
            let behavior = rest.split('"').next().unwrap_or("?").to_string();
            *counts.entry(behavior).or_default() += 1;
        }
    }
    let total: usize = counts.values().sum();
    let parts: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    Ok(format!("{total} cases: {}", parts.join(", ")))
}

fn free_port() -> std::result::Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
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
    )?;
    // The fuzz targets are a workspace of their own that `cargo xtask fuzz` alone builds: a
    // change of the API they call (a new codec event) broke them once without anyone seeing.
    let fuzz = ["--manifest-path", "fuzz/Cargo.toml"];
    run("cargo", &[&["fmt"][..], &fuzz, &["--", "--check"]].concat())?;
    run("cargo", &[&["check"][..], &fuzz, &["--bins"]].concat())
}

fn test() -> Result {
    run("cargo", &["test", "--workspace", "--all-targets"])?;
    run("cargo", &["test", "--workspace", "--doc"])
}

/// The architecture's layering (see `layering.rs`).
fn layering() -> Result {
    for line in layering::check()? {
        println!("layering: {line}");
    }
    Ok(())
}

/// What the tests need beyond cargo: make (jemalloc's build), curl (the spec's handshake),
/// nats-server (scale-out, three-server cluster, TLS and permission tests; their
/// certificates, keys and JWTs are made in Rust, so no openssl or nsc) from Debian, and
/// nats-py (the Python handler example) from PyPI. Installs what is missing, where we may.
fn install_system_deps() -> Result {
    // make: jemalloc (the binaries' allocator) is built with configure and make.
    let missing: Vec<&str> = [
        ("curl", "curl"),
        ("nats-server", "nats-server"),
        ("make", "make"),
    ]
    .into_iter()
    .filter(|(tool, _)| !have(tool) && !have(&format!("/usr/sbin/{tool}")))
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    let has_nats_py = Command::new("python3")
        .args(["-c", "import nats"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nats_py {
        run(
            "python3",
            &[
                "-m",
                "pip",
                "install",
                "--quiet",
                "-r",
                "examples/python/requirements.txt",
            ],
        )?;
    }
    Ok(())
}

/// Installs Debian packages (with sudo unless we are root).
pub(crate) fn apt_install(packages: &[&str]) -> Result {
    println!("installing {packages:?}");
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut full: Vec<&str> = sudo.to_vec();
        full.extend_from_slice(args);
        run(full[0], &full[1..])
    };
    apt(&["apt-get", "update", "-qq"])?;
    let mut install = vec![
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "install",
        "-y",
        "-qq",
    ];
    install.extend_from_slice(packages);
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn a_path_the_user_typed_is_made_absolute() {
        // A bare name would be looked up in PATH when run; it must name the file here.
        let p = super::users_path(Path::new("bench-server.old"));
        assert!(p.is_absolute(), "{}", p.display());
        assert!(p.ends_with("bench-server.old"));
        assert_eq!(super::users_path(Path::new("/tmp/b")), Path::new("/tmp/b"));
    }
}

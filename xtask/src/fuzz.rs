//! `cargo xtask fuzz [TARGET] [--seconds N]`: runs the cargo-fuzz targets in `fuzz/` (every
//! target when none is named), each for N seconds (default 60), installing cargo-fuzz first
//! if it is missing. Not part of `ci`.
//!
//! Toolchain: cargo-fuzz's default sanitizer (address) passes `-Zsanitizer=address`, which a
//! stable rustc refuses ("the option `Z` is only accepted on the nightly compiler"). With
//! `--sanitizer none`, cargo-fuzz passes only stable flags (`-Cpasses=sancov-module` and
//! `-Cllvm-args=-sanitizer-coverage-*` for libFuzzer's coverage feedback, `--cfg fuzzing`,
//! `-Cdebug-assertions`), so it builds and runs on stable with no `RUSTC_BOOTSTRAP`: checked
//! with rustc 1.95 and cargo-fuzz 0.13. That is what this task uses. Our code is
//! `#![forbid(unsafe_code)]`, so what the fuzzers hunt is panics (including overflow and
//! debug assertions) and broken invariants, which need no sanitizer. For AddressSanitizer
//! (memory errors in dependencies' unsafe code, e.g. serde_yaml's libyaml port), pass
//! `--asan`: it runs cargo-fuzz with its default sanitizer and `RUSTC_BOOTSTRAP=1`, which
//! lets a stable rustc accept `-Z` flags (6-8x fewer execs/s here). Beware: cargo caches its
//! rustc probe in `TARGET_DIR/.rustc_info.json` without `RUSTC_BOOTSTRAP` in the cache key,
//! so after one ASan attempt without it, every later attempt fails with "the option `Z` is
//! only accepted on the nightly compiler" until that file is deleted. `--asan` therefore
//! builds in its own target dir and deletes that file first.

use std::path::Path;
use std::process::Command;

use crate::{run, Result};

const DEFAULT_SECONDS: u64 = 60;
const FUZZ_DIR: &str = "fuzz";
/// ASan builds go here, so switching sanitizers does not rebuild everything each time.
const ASAN_TARGET_DIR: &str = "fuzz/target/asan";

/// `cargo xtask fuzz [TARGET] [--seconds N] [--asan]`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// A target of fuzz/fuzz_targets/ (default: every target)
    target: Option<String>,
    /// Seconds per target
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SECONDS, value_parser = positive)]
    seconds: u64,
    /// AddressSanitizer (RUSTC_BOOTSTRAP=1 and its own target dir; see the module docs)
    #[arg(long)]
    asan: bool,
}

fn positive(value: &str) -> std::result::Result<u64, String> {
    value
        .parse()
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| "wants a positive whole number".into())
}

/// Entry point.
pub(crate) fn fuzz(args: &Args) -> Result {
    let available = targets()?;
    let (seconds, asan) = (args.seconds, args.asan);
    let chosen = match &args.target {
        Some(word) if !available.contains(word) => {
            return Err(format!(
                "no fuzz target `{word}`; targets: {}",
                available.join(", ")
            ))
        }
        chosen => chosen.clone(),
    };
    let targets = match chosen {
        Some(t) => vec![t],
        None => available,
    };

    if !have_cargo_fuzz() {
        run("cargo", &["install", "cargo-fuzz", "--locked"])?;
    }
    let mut crashed = Vec::new();
    for target in &targets {
        println!("fuzz: {target} for {seconds} s");
        let max_time = format!("-max_total_time={seconds}");
        let result = if asan {
            // A cache only; see the module docs.
            let _ = std::fs::remove_file(Path::new(ASAN_TARGET_DIR).join(".rustc_info.json"));
            run_env(
                "cargo",
                &[
                    "fuzz",
                    "run",
                    "--target-dir",
                    ASAN_TARGET_DIR,
                    target,
                    "--",
                    &max_time,
                ],
                ("RUSTC_BOOTSTRAP", "1"),
            )
        } else {
            run(
                "cargo",
                &[
                    "fuzz",
                    "run",
                    "--sanitizer",
                    "none",
                    target,
                    "--",
                    &max_time,
                ],
            )
        };
        if let Err(e) = result {
            eprintln!("fuzz: {target}: {e}");
            crashed.push(target.as_str());
        }
    }
    if crashed.is_empty() {
        println!(
            "fuzz: no crash in {} ({seconds} s each)",
            targets.join(", ")
        );
        Ok(())
    } else {
        Err(format!(
            "{} failed; the crashing input is under {FUZZ_DIR}/artifacts/TARGET/ \
             (replay: cargo fuzz run --sanitizer none TARGET FILE)",
            crashed.join(", ")
        ))
    }
}

/// The targets: the file names in `fuzz/fuzz_targets/`, sorted.
fn targets() -> std::result::Result<Vec<String>, String> {
    let dir = Path::new(FUZZ_DIR).join("fuzz_targets");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(format!("no fuzz targets in {}", dir.display()));
    }
    Ok(names)
}

fn have_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run_env(program: &str, args: &[&str], (key, value): (&str, &str)) -> Result {
    println!("$ {key}={value} {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .env(key, value)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

//! The architecture's layering, checked from `cargo metadata`: which workspace crate may
//! depend on which (normal dependencies; tests and benchmarks may use anything). `cargo
//! xtask layering` runs it, and so does a test, so `cargo test --workspace` fails when an
//! arrow points the wrong way.

use std::collections::BTreeMap;
use std::process::Command;

/// Every workspace crate, and the workspace crates it may depend on.
const ALLOWED: &[(&str, &[&str])] = &[
    // The seam between the gateway and its transports knows neither.
    ("switchboard-core", &[]),
    // The leaves know nothing of each other; transports know only the seam.
    ("switchboard-config", &[]),
    ("switchboard-bus", &[]),
    ("switchboard-registry", &[]),
    ("switchboard-tls", &[]),
    // Outbound calls (JWKS, HTTP handlers) trust what the TLS crate says.
    ("switchboard-http-client", &["switchboard-tls"]),
    (
        "switchboard-transport",
        &["switchboard-core", "switchboard-tls"],
    ),
    ("switchboard-transport-memory", &["switchboard-core"]),
    ("switchboard-transport-sse", &["switchboard-core"]),
    // Handlers over HTTP: bus messages in, signed requests out through the outbound client.
    (
        "switchboard-http-handlers",
        &["switchboard-bus", "switchboard-http-client"],
    ),
    // A broker bus implements the bus trait and nothing else.
    ("switchboard-bus-nats", &["switchboard-bus"]),
    // The facade puts the leaves together; it never links a broker client.
    (
        "switchboard",
        &[
            "switchboard-core",
            "switchboard-config",
            "switchboard-bus",
            "switchboard-registry",
            "switchboard-tls",
            "switchboard-http-client",
            "switchboard-http-handlers",
            // Only to pick the default transports (src/transports.rs).
            "switchboard-transport",
            "switchboard-transport-sse",
        ],
    ),
    // What the test suites share; a dev-dependency only.
    (
        "switchboard-test-support",
        &[
            "switchboard",
            "switchboard-core",
            "switchboard-tls",
            "switchboard-transport-memory",
        ],
    ),
    (
        "switchboard-server",
        &["switchboard", "switchboard-bus-nats"],
    ),
    // The benchmarks measure the gateway through the facade, and its floor (`bench-server
    // --floor`) on the transport alone, to show what the layers above the transport cost; a
    // benchmark crate nobody depends on may reach past the facade for that.
    (
        "switchboard-bench",
        &[
            "switchboard",
            "switchboard-bus-nats",
            "switchboard-transport",
        ],
    ),
    ("xtask", &["switchboard-config"]),
];

/// The workspace crates' normal dependencies on each other, by crate.
fn workspace_dependencies() -> Result<BTreeMap<String, Vec<String>>, String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .map_err(|e| format!("cargo metadata: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let mut deps = BTreeMap::new();
    for package in &packages {
        let name = package["name"].as_str().unwrap_or_default().to_string();
        let normal = package["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| d["kind"].is_null()) // normal (not dev, not build)
            .filter_map(|d| d["name"].as_str())
            .filter(|d| names.contains(d))
            .map(String::from)
            .collect();
        deps.insert(name, normal);
    }
    Ok(deps)
}

/// Checks every workspace crate against [`ALLOWED`]; a crate the table does not know is an
/// error too (a new crate must say where it sits).
pub(crate) fn check() -> Result<Vec<String>, String> {
    let mut report = Vec::new();
    let mut wrong = Vec::new();
    for (name, deps) in workspace_dependencies()? {
        let Some((_, allowed)) = ALLOWED.iter().find(|(n, _)| *n == name) else {
            wrong.push(format!(
                "{name} is not in xtask/src/layering.rs: say what it may depend on"
            ));
            continue;
        };
        let bad: Vec<&String> = deps
            .iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        if bad.is_empty() {
            report.push(format!(
                "{name} → {}",
                if deps.is_empty() {
                    "(no workspace crate)".into()
                } else {
                    deps.join(", ")
                }
            ));
        } else {
            wrong.push(format!("{name} must not depend on {bad:?}"));
        }
    }
    if wrong.is_empty() {
        Ok(report)
    } else {
        Err(wrong.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_arrow_points_the_way_the_architecture_says() {
        let report = super::check().unwrap_or_else(|e| panic!("{e}"));
        assert!(report
            .iter()
            .any(|l| l.starts_with("switchboard-bus-nats → switchboard-bus")));
    }
}

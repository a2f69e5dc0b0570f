//! Config loading: the spec's file, our own, and every bad-config case.

use std::path::PathBuf;
use std::time::Duration;

use switchboard_config::{Algorithm, Config, ConfigError};

fn repo_file(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn bad(yaml: &str) -> ConfigError {
    Config::from_yaml_str(yaml).expect_err("config should be rejected")
}

#[test]
fn spec_example_loads_unchanged() {
    let c = Config::from_file(repo_file("conf/examples/spec.yaml")).unwrap();
    let s = &c.gateway.socket;
    assert_eq!(s.path.as_str(), "/connect");
    assert_eq!(
        s.onconnect.as_ref().unwrap().publish.as_str(),
        "socket:connection"
    );
    let om = s.onmessage.as_ref().unwrap();
    assert_eq!(
        om.publish.as_ref().unwrap().as_str(),
        "socket:generalMessage"
    );
    let types: Vec<_> = om
        .types
        .iter()
        .map(|t| (t.message_type.as_str(), t.publish.as_str()))
        .collect();
    assert_eq!(
        types,
        [
            ("message_type_one", "socket:type_one"),
            ("message_type_two", "socket:type_two")
        ]
    );
    assert_eq!(s.onclose.as_ref().unwrap().publish.as_str(), "socket:close");
    assert_eq!(s.send.as_ref().unwrap().subscribe.as_str(), "socket:send");
    assert_eq!(
        s.broadcast.as_ref().unwrap().subscribe.as_str(),
        "socket:broadcast"
    );
    // extensions take their defaults
    assert_eq!(c.gateway.listen.to_string(), "127.0.0.1:4000");
    assert_eq!(s.heartbeat, Duration::from_secs(30));
}

#[test]
fn repo_socket_yaml_loads() {
    let c = Config::from_file(repo_file("conf/socket.yaml")).unwrap();
    assert_eq!(c.gateway.auth.cookie, "ID_TOKEN");
    assert_eq!(c.gateway.socket.max_message_size, 64 * 1024);
}

#[test]
fn every_hook_is_optional() {
    let c = Config::from_yaml_str("gateway:\n  socket:\n    path: /ws\n").unwrap();
    let s = &c.gateway.socket;
    assert!(s.onconnect.is_none());
    assert!(s.onmessage.is_none());
    assert!(s.onclose.is_none());
    assert!(s.send.is_none());
    assert!(s.broadcast.is_none());
    let c = Config::from_yaml_str(
        "gateway:\n  socket:\n    onmessage:\n      types:\n        - {type: a, publish: t}\n",
    )
    .unwrap();
    assert!(c.gateway.socket.onmessage.unwrap().publish.is_none());
}

#[test]
fn extensions_parse() {
    let c = Config::from_yaml_str(
        r#"
gateway:
  listen: "0.0.0.0:9000"
  socket:
    heartbeat: 1m 30s
    max_message_size: 1MiB
    send_queue: 8
  auth:
    algorithm: ES256
    public_key_file: /etc/keys/pub.pem
    username_claim: sub
    leeway: 5s
"#,
    )
    .unwrap();
    assert_eq!(c.gateway.listen.port(), 9000);
    assert_eq!(c.gateway.socket.heartbeat, Duration::from_secs(90));
    assert_eq!(c.gateway.socket.max_message_size, 1 << 20);
    assert_eq!(c.gateway.socket.send_queue, 8);
    assert_eq!(c.gateway.auth.algorithm, Algorithm::ES256);
    assert_eq!(c.gateway.auth.username_claim, "sub");
    assert_eq!(c.gateway.auth.leeway, Duration::from_secs(5));
}

#[test]
fn unknown_key_is_named_with_line_and_column() {
    let e = bad("gateway:\n  socket:\n    path: /x\n    onconect:\n      publish: t\n");
    let msg = e.to_string();
    assert!(msg.contains("unknown field `onconect`"), "{msg}");
    assert!(msg.contains("gateway.socket"), "{msg}");
    assert_eq!(e.line(), Some(4), "{msg}");
    assert_eq!(e.column(), Some(5), "{msg}");
}

#[test]
fn errors_at_the_documents_start_are_placed_or_said_plainly() {
    // The parser leaves out the position of the first character of the document.
    let e = bad("other: 1\ngateway:\n  socket: {}\n");
    assert!(e.to_string().contains("unknown field `other`"), "{e}");
    assert_eq!((e.line(), e.column()), (Some(1), Some(1)), "{e}");
    assert!(e.to_string().ends_with("at line 1 column 1"), "{e}");
    let e = bad("- a\n- b\n");
    assert_eq!(e.line(), Some(1), "{e}");
    let e = bad("# nothing but a comment\n\n");
    assert_eq!(
        e.to_string(),
        "the config is empty: it needs a `gateway:` section"
    );
    let e = bad("gateway:\n  socket: {}\n---\ngateway:\n  socket: {}\n");
    assert!(e.to_string().contains("more than one YAML document"), "{e}");
    assert_eq!(e.line(), Some(3), "{e}");
    // A document that starts with `---` is one document.
    let ok = Config::from_yaml_str("---\ngateway:\n  socket: {}\n");
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn unknown_key_deep_inside_types() {
    let e = bad("gateway:\n  socket:\n    onmessage:\n      types:\n        - type: a\n          publsh: t\n");
    assert!(e.to_string().contains("unknown field `publsh`"), "{e}");
    assert_eq!(e.line(), Some(6), "{e}");
}

#[test]
fn path_must_start_with_slash() {
    let e = bad("gateway:\n  socket:\n    path: connect\n");
    assert!(e.to_string().contains("must start with `/`"), "{e}");
    assert!(e.to_string().starts_with("gateway.socket: path"), "{e}");
    assert_eq!(e.line(), Some(3), "{e}");
}

#[test]
fn a_path_no_request_could_match_is_rejected() {
    // A trailing newline (from `${VAR}` or `path: |`), a tab, a letter outside ASCII.
    for path in [r#""/connect\n""#, r#""/con\tnect""#, "/café"] {
        let e = bad(&format!("gateway:\n  socket:\n    path: {path}\n"));
        assert!(
            e.to_string().contains("must be visible ASCII"),
            "{path}: {e}"
        );
        assert!(e.to_string().starts_with("gateway.socket: path"), "{e}");
        assert_eq!(e.line(), Some(3), "{e}");
    }
    let e = bad("gateway:\n  socket:\n    sse: {path: \"/s\\u0000e\"}\n");
    assert!(e.to_string().contains("must be visible ASCII"), "{e}");
    let ok = Config::from_yaml_str(
        "gateway:\n  socket:\n    path: \"/a-b_c.d~e/%C3%A9:@!$&'()*+,;=\"\n",
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn two_built_ins_on_one_topic_are_rejected_naming_both() {
    let e = bad(
        "gateway:\n  socket:\n    send: {subscribe: t}\n    broadcast: {subscribe: u}\n    \
         disconnect: {subscribe: t}\n",
    );
    assert!(
        e.to_string().starts_with(
            "gateway.socket.disconnect.subscribe: `t` is the topic of gateway.socket.send too"
        ),
        "{e}"
    );
    assert_eq!(e.line(), Some(5), "{e}");
    let e = bad("gateway:\n  socket:\n    send: {subscribe: t}\n    broadcast: {subscribe: t}\n");
    assert!(
        e.to_string()
            .contains("`t` is the topic of gateway.socket.send too"),
        "{e}"
    );
    assert_eq!(e.line(), Some(4), "{e}");
    let ok = Config::from_yaml_str(
        "gateway:\n  socket:\n    send: {subscribe: t}\n    broadcast: {subscribe: u}\n    \
         disconnect: {subscribe: v}\n",
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn auth_values_that_could_never_match_are_rejected_at_their_line() {
    for (key, value, says) in [
        ("cookie", "\"a=b; c\"", "is not a cookie name"),
        ("cookie", "\"ID TOKEN\"", "is not a cookie name"),
        ("username_claim", "\"  \"", "must name a claim"),
        ("issuer", "\"\"", "auth.issuer must not be empty"),
        ("audience", "\" \"", "auth.audience must not be empty"),
        (
            "namespace_claim",
            "\"\"",
            "auth.namespace_claim must not be empty",
        ),
    ] {
        let e = bad(&format!(
            "gateway:\n  socket: {{}}\n  auth:\n    secret_env: S\n    {key}: {value}\n"
        ));
        assert!(e.to_string().contains(says), "{key}: {e}");
        assert_eq!(e.line(), Some(5), "{key}: {e}");
    }
    let ok = Config::from_yaml_str(
        "gateway:\n  socket: {}\n  auth:\n    cookie: __Host-id_token.v2\n    issuer: https://id.example\n",
    );
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn limits_that_refuse_everything_or_mean_nothing_alone_are_rejected() {
    let limits = |body: &str| format!("gateway:\n  socket: {{}}\n  limits:\n{body}");
    let e = bad(&limits("    message_burst: 10\n"));
    assert!(
        e.to_string()
            .starts_with("gateway.limits.message_burst: is set without messages_per_second"),
        "{e}"
    );
    assert_eq!(e.line(), Some(4), "{e}");
    let e = bad(&limits("    max_request_head: 1\n"));
    assert!(e.to_string().contains("at least 1KiB"), "{e}");
    assert_eq!(e.line(), Some(4), "{e}");
    let e = bad(&limits("    buffer_budget: 1KiB\n"));
    assert!(
        e.to_string()
            .contains("is less than gateway.socket.max_message_size"),
        "{e}"
    );
    assert_eq!(e.line(), Some(4), "{e}");
    let ok = Config::from_yaml_str(&limits(
        "    messages_per_second: 5\n    message_burst: 10\n    max_request_head: 1KiB\n    buffer_budget: 1MiB\n",
    ));
    assert!(ok.is_ok(), "{ok:?}");
}

#[test]
fn empty_topic_is_rejected() {
    let e = bad("gateway:\n  socket:\n    onclose:\n      publish: \"\"\n");
    assert!(e.to_string().contains("topic must not be empty"), "{e}");
    assert!(e.to_string().starts_with("gateway.socket.onclose:"), "{e}");
    assert_eq!(e.line(), Some(4), "{e}");
}

#[test]
fn duplicate_type_is_rejected() {
    let e = bad(
        "gateway:\n  socket:\n    onmessage:\n      types:\n        - type: a\n          publish: t1\n        - type: a\n          publish: t2\n",
    );
    assert!(
        e.to_string()
            .contains("gateway.socket.onmessage.types: duplicate type `a`: entries 1 and 2"),
        "{e}"
    );
    assert_eq!(e.line(), Some(7), "the later entry's line: {e}");
    // In flow style there is no item line: the list's own, never an item of a list below.
    let e = bad(
        "gateway:\n  socket:\n    onmessage:\n      types: [{type: a, publish: t1}, {type: a, publish: t2}]\n    allowed_origins:\n      - https://a.example\n      - https://b.example\n",
    );
    assert!(e.to_string().contains("duplicate type `a`"), "{e}");
    assert_eq!(e.line(), Some(4), "{e}");
}

#[test]
fn bad_duration_size_and_queue() {
    let e = bad("gateway:\n  socket:\n    heartbeat: soon\n");
    assert!(e.to_string().contains("invalid duration `soon`"), "{e}");
    assert_eq!(e.line(), Some(3));
    let e = bad("gateway:\n  socket:\n    max_message_size: 10 parsecs\n");
    assert!(e.to_string().contains("invalid size unit"), "{e}");
    // A fraction is named as such, written as text or as a YAML number; a YAML float is
    // refused even when whole (`2.0` would be 2 bytes).
    for (size, says) in [
        ("1.5MiB", "has a fraction"),
        ("1.5", "is a decimal number"),
        ("2.0", "is a decimal number"),
        ("1e3", "is a decimal number"),
    ] {
        let e = bad(&format!(
            "gateway:\n  socket:\n    max_message_size: {size}\n"
        ));
        assert!(
            e.to_string()
                .starts_with("gateway.socket.max_message_size: size `")
                && e.to_string().contains(says),
            "{size}: {e}"
        );
        assert_eq!(e.line(), Some(3), "{e}");
    }
    let e = bad("gateway:\n  socket:\n    send_queue: 0\n");
    assert!(
        e.to_string().contains("send_queue must be at least 1"),
        "{e}"
    );
    let e = bad("gateway:\n  socket:\n    heartbeat: 0s\n");
    assert!(
        e.to_string().contains("heartbeat must be at least 10ms"),
        "{e}"
    );
}

#[test]
fn a_bad_value_is_named_at_its_own_line_and_key() {
    // (yaml, the key path the message starts with, what it says, the value's line)
    for (yaml, key, says, line) in [
        (
            "gateway:\n  listen: \"127.0.0.1:4000\"\n  socket: {}\n  drain: 5\n",
            "gateway.drain:",
            "invalid duration `5`",
            4,
        ),
        (
            "gateway:\n  socket:\n    path: /x\n    max_message_size: 12QB\n",
            "gateway.socket.max_message_size:",
            "invalid size unit",
            4,
        ),
        (
            "gateway:\n  socket: {}\n  limits:\n    max_sockets: 10\n    messages_per_second: 0\n",
            "gateway.limits.messages_per_second:",
            "limits must be at least 1",
            5,
        ),
        (
            "gateway:\n  socket: {}\n  limits:\n    message_burst: 5000000000\n",
            "gateway.limits.message_burst:",
            "5000000000 is too large",
            4,
        ),
        (
            "gateway:\n  socket: {}\n  limits:\n    max_handshakes: 0\n",
            "gateway.limits.max_handshakes:",
            "must be at least 1",
            4,
        ),
        // Durations past ten years overflowed a deadline (a panic per connection) or
        // wrapped `now - leeway` (every token expired): refused here instead.
        (
            "gateway:\n  socket: {}\n  limits:\n    handshake_timeout: 500000000000y\n",
            "gateway.limits.handshake_timeout:",
            "is too long",
            4,
        ),
        (
            "gateway:\n  socket: {}\n  limits:\n    handshake_timeout: 11y\n",
            "gateway.limits.handshake_timeout:",
            "is too long (at most 10 years)",
            4,
        ),
        (
            "gateway:\n  socket: {}\n  auth:\n    secret_env: S\n    leeway: 57y\n",
            "gateway.auth.leeway:",
            "is too long (at most 10 years)",
            5,
        ),
    ] {
        let e = bad(yaml);
        let text = e.to_string();
        assert!(text.starts_with(key), "{text}");
        assert!(text.contains(says), "{text}");
        assert_eq!(e.line(), Some(line), "{text}");
    }
    // Ten years is still a duration.
    let ok = "gateway:\n  socket: {}\n  auth:\n    secret_env: S\n    leeway: 10y\n";
    assert!(Config::from_yaml_str(ok).is_ok());
}

#[test]
fn bad_listen_address() {
    let e = bad("gateway:\n  listen: localhost\n  socket: {}\n");
    assert!(e.to_string().contains("gateway.listen"), "{e}");
    assert_eq!(e.line(), Some(2));
}

#[test]
fn auth_combinations_are_checked() {
    let e = bad("gateway:\n  socket: {}\n  auth:\n    algorithm: RS256\n");
    assert!(e.to_string().contains("public_key_file is required"), "{e}");
    assert!(e.line().is_some(), "{e}");
    let e = bad("gateway:\n  socket: {}\n  auth:\n    public_key_file: k.pem\n");
    assert!(
        e.to_string()
            .contains("auth.public_key_file is for RS*/ES*"),
        "{e}"
    );
    let e = bad("gateway:\n  socket: {}\n  auth:\n    algorithm: none\n");
    assert!(e.to_string().contains("unknown variant `none`"), "{e}");
    let e = bad("gateway:\n  socket: {}\n  auth:\n    secret: hunter2\n");
    assert!(e.to_string().contains("unknown field `secret`"), "{e}");
}

#[test]
fn jwks_parses_with_defaults_and_its_conflicts_name_the_key_and_line() {
    let c = Config::from_yaml_str(
        "gateway:\n  socket: {}\n  auth:\n    jwks_url: https://id.example.com/jwks\n",
    )
    .unwrap();
    let jwks = c.gateway.auth.jwks.as_ref().unwrap();
    assert_eq!(jwks.url, "https://id.example.com/jwks");
    assert_eq!(jwks.min_refresh, std::time::Duration::from_secs(60));
    assert_eq!(jwks.max_refresh, std::time::Duration::from_secs(3600));
    assert_eq!(jwks.refetch_interval, std::time::Duration::from_secs(30));
    assert_eq!(jwks.algorithms.len(), 3);
    assert_eq!(jwks.max_stale, None, "fail open unless asked");
    let c = Config::from_yaml_str(
        "gateway:\n  socket: {}\n  auth:\n    jwks_url: http://127.0.0.1:8080/k\n    jwks:\n      algorithms: [EdDSA]\n      ca_file: /ca.pem\n      max_stale: 24h\n",
    )
    .unwrap();
    let jwks = c.gateway.auth.jwks.unwrap();
    assert_eq!(
        jwks.max_stale,
        Some(std::time::Duration::from_secs(24 * 3600))
    );
    assert_eq!(jwks.algorithms, [switchboard_config::Algorithm::EdDSA]);
    assert_eq!(jwks.ca_file.unwrap().to_str(), Some("/ca.pem"));

    for (extra, key) in [
        ("    secret_env: S\n", "auth.secret_env"),
        ("    public_key_file: k.pem\n", "auth.public_key_file"),
        ("    algorithm: RS256\n", "auth.algorithm"),
    ] {
        let e = bad(&format!(
            "gateway:\n  socket: {{}}\n  auth:\n    jwks_url: https://id.example.com/\n{extra}"
        ));
        let text = e.to_string();
        assert!(
            text.contains(&format!("auth.jwks_url conflicts with {key}")),
            "{text}"
        );
        // At the key that conflicts (the one to take out), not at `jwks_url`.
        assert_eq!(e.line(), Some(5), "{text}");
    }
    // A key of the `jwks` subsection: its own line, not the `jwks:` line.
    let e = bad(
        "gateway:\n  socket: {}\n  auth:\n    jwks_url: https://id.example.com/\n    jwks:\n      \
         min_refresh: 1m\n      max_refresh: 1s\n",
    );
    assert!(e.to_string().contains("auth.jwks.max_refresh"), "{e}");
    assert_eq!(e.line(), Some(7), "{e}");
    // The URL itself: its own key and line.
    // Plain HTTP only to this machine: anyone on the path could serve their own keys.
    for (url, ok) in [
        ("http://id.example.com/jwks", false),
        ("http://10.0.0.5:8080/jwks", false),
        ("http://localhost:8080/jwks", true),
        ("http://127.0.0.1/jwks", true),
        ("http://[::1]:9000/jwks", true),
    ] {
        let text = format!("gateway:\n  socket: {{}}\n  auth:\n    jwks_url: \"{url}\"\n");
        match Config::from_yaml_str(&text) {
            Ok(_) => assert!(ok, "{url} accepted"),
            Err(e) => {
                assert!(!ok, "{url}: {e}");
                assert!(e.to_string().contains("must be https://"), "{e}");
                assert_eq!(e.line(), Some(4));
            }
        }
    }
    for url in [
        "ftp://x/",
        "id.example.com/jwks",
        "https:///jwks",
        "https://u:TopSecret@x/",
    ] {
        let e = bad(&format!(
            "gateway:\n  socket: {{}}\n  auth:\n    jwks_url: \"{url}\"\n"
        ));
        let text = e.to_string();
        assert!(text.contains("gateway.auth: jwks_url `"), "{text}");
        assert!(!text.contains("TopSecret"), "no password shown: {text}");
        assert!(
            text.contains("must be an http:// or https:// URL"),
            "{text}"
        );
        assert_eq!(e.line(), Some(4), "{text}");
    }
    let e = bad("gateway:\n  socket: {}\n  auth:\n    jwks:\n      timeout: 1s\n");
    assert!(
        e.to_string()
            .contains("auth.jwks is set without auth.jwks_url"),
        "{e}"
    );
    let jwks = |section: &str| {
        bad(&format!(
            "gateway:\n  socket: {{}}\n  auth:\n    jwks_url: https://x/\n    jwks:\n{section}"
        ))
        .to_string()
    };
    let e = jwks("      algorithms: [HS256]\n");
    assert!(e.contains("HS256 is a shared-secret algorithm"), "{e}");
    let e = jwks("      min_refresh: 10m\n      max_refresh: 1m\n");
    assert!(e.contains("max_refresh must be at least"), "{e}");
    // The default max_refresh (1h) and timeout (5s): at least 2h 5s.
    let e = jwks("      max_stale: 2h\n");
    assert!(
        e.contains(
            "max_stale (2h) must be at least twice auth.jwks.max_refresh plus \
             auth.jwks.timeout (2h 5s here)"
        ),
        "{e}"
    );
    let e = jwks("      max_stale: soon\n");
    assert!(e.contains("invalid duration `soon`"), "{e}");
    assert!(e.contains("line 6"), "{e}");
    let e = jwks("      refetch_interval: 10ms\n");
    assert!(e.contains("refetch_interval must be at least 1s"), "{e}");
    let e = jwks("      refetch: 1s\n");
    assert!(e.contains("unknown field `refetch`"), "{e}");
    assert!(e.contains("line 6"), "{e}");
}

#[test]
fn missing_socket_section_and_syntax_errors() {
    let e = bad("gateway: {}\n");
    assert!(e.to_string().contains("missing field `socket`"), "{e}");
    let e = bad("gateway:\n  socket: [\n");
    assert!(e.line().is_some(), "{e}");
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("socket.yaml");
    std::fs::write(&p, "gateway:\n  sockt: {}\n").unwrap();
    let e = Config::from_file(&p).unwrap_err();
    assert!(e.to_string().starts_with(&p.display().to_string()), "{e}");
    let e = Config::from_file(dir.path().join("missing.yaml")).unwrap_err();
    assert!(e.to_string().contains("cannot read config file"), "{e}");
    // Not a config file: refused after reading 1 MiB, not read to the end (or forever).
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(2 << 20))).unwrap();
    let e = Config::from_file(&big).unwrap_err();
    assert!(e.to_string().contains("larger than 1 MiB"), "{e}");
    let e = Config::from_file("/dev/zero").unwrap_err();
    assert!(e.to_string().contains("larger than 1 MiB"), "{e}");
}

#[test]
fn the_auth_sections_own_checks_name_a_line_in_it() {
    // jwks without jwks_url: at the `jwks:` line, not the gateway's.
    let e =
        bad("gateway:\n  socket: {}\n  auth:\n    secret_env: S\n    jwks:\n      timeout: 5s\n");
    assert!(
        e.to_string()
            .contains("auth.jwks is set without auth.jwks_url"),
        "{e}"
    );
    assert_eq!(e.line(), Some(5), "{e}");
    // A required key that is missing: at the `auth:` line.
    let e = bad("gateway:\n  socket: {}\n  auth:\n    algorithm: RS256\n");
    assert!(e.to_string().contains("public_key_file is required"), "{e}");
    assert_eq!(e.line(), Some(3), "{e}");
    // Comments, a commented-out key and a topic named like the section are not it.
    let e = bad(
        "gateway:\n  socket:\n    onclose: {publish: \"auth:closed\"}\n  # auth: below\n  auth:\n    # public_key_file: k.pem\n    algorithm: RS256\n",
    );
    assert!(e.to_string().contains("public_key_file is required"), "{e}");
    assert_eq!(e.line(), Some(5), "{e}");
}

#[test]
fn deep_nesting_is_refused_before_parsing() {
    // 200,000 levels kept the YAML parser busy for minutes; refused at once.
    let deep = format!("gateway: {}{}\n", "[".repeat(200_000), "]".repeat(200_000));
    let e = bad(&deep);
    assert!(e.to_string().contains("nest deeper than 128 levels"), "{e}");
    assert_eq!(e.line(), Some(1));
    // A config with a little nesting is fine, and brackets in strings and comments do not
    // count.
    assert!(Config::from_yaml_str("gateway:\n  socket: {onclose: {publish: t}}\n").is_ok());
    let quoted = format!(
        "gateway:\n  socket:\n    path: \"/{}\"\n    onclose: {{publish: '{}'}} # {}\n",
        "[".repeat(200),
        "{".repeat(200),
        "[".repeat(200)
    );
    assert!(Config::from_yaml_str(&quoted).is_ok());
}

#[test]
fn limits_origins_and_drain_parse() {
    let c = Config::from_yaml_str(
        r#"
gateway:
  drain: 3s
  socket:
    allowed_origins: ["https://app.example.com", "http://localhost:4000"]
  limits:
    max_sockets: 100
    max_sockets_per_user: 3
    handshake_timeout: 2s
    messages_per_second: 20
    message_burst: 40
  auth:
    namespace_claim: tenants
"#,
    )
    .unwrap();
    assert_eq!(c.gateway.drain, Duration::from_secs(3));
    let l = &c.gateway.limits;
    assert_eq!(
        (l.max_sockets, l.max_sockets_per_user),
        (Some(100), Some(3))
    );
    assert_eq!(l.handshake_timeout, Duration::from_secs(2));
    assert_eq!(
        (l.messages_per_second, l.message_burst),
        (Some(20), Some(40))
    );
    assert_eq!(c.gateway.socket.allowed_origins.as_ref().unwrap().len(), 2);
    assert_eq!(c.gateway.auth.namespace_claim.as_deref(), Some("tenants"));
    let d = Config::from_yaml_str("gateway:\n  socket: {}\n").unwrap();
    assert!(d.gateway.socket.allowed_origins.is_none());
    assert!(d.gateway.limits.max_sockets.is_none());
    assert_eq!(d.gateway.drain, Duration::from_secs(10));
}

#[test]
fn bad_origins_are_rejected() {
    for bad in [
        "example.com",
        "https://example.com/app",
        "ftp://x",
        "https://",
        "https://user@example.com",
        "https://example.com:99999",
        "https://example.com:",
        "https://*.example.com",
        "https://example.com?x",
        "https://[::1]x",
        "https://[]",
    ] {
        let e = bad_origin(bad);
        assert!(
            e.to_string().contains("allowed_origins entry"),
            "{bad}: {e}"
        );
        assert_eq!(e.line(), Some(3), "{e}");
    }
}

/// A bad entry of a block list is placed at its own line, not at the section's first key
/// (where the parser puts errors found once the list is read).
#[test]
fn a_bad_list_entry_is_placed_at_its_own_line() {
    let cases = [
        (
            "gateway:\n  socket:\n    path: /connect\n    allowed_origins:\n      - https://ok.example\n      - example.com\n",
            "allowed_origins entry `example.com`",
            6,
        ),
        (
            "gateway:\n  socket:\n    path: /connect\n    heartbeat: 30s\n    context_headers:\n      - user-agent\n      - cookie\n",
            "context_headers entry `cookie`",
            7,
        ),
        (
            "gateway:\n  socket:\n    path: /connect\n    context_headers:\n      - x-a\n      - \"bad header\"\n",
            "context_headers entry `bad header`",
            6,
        ),
        // An entry that holds the bad one is not it.
        (
            "gateway:\n  socket:\n    allowed_origins:\n      - https://example.com\n      - example.com # no scheme\n",
            "allowed_origins entry `example.com`",
            5,
        ),
        (
            "gateway:\n  socket:\n    context_headers:\n      - x-cookie-consent\n      - Cookie\n",
            "context_headers entry `Cookie`",
            5,
        ),
        // Flow style: the list's line.
        (
            "gateway:\n  socket:\n    path: /connect\n    context_headers: [x-a, cookie]\n",
            "context_headers entry `cookie`",
            4,
        ),
    ];
    for (yaml, says, line) in cases {
        let e = bad(yaml);
        assert!(e.to_string().contains(says), "{e}");
        assert_eq!(e.line(), Some(line), "{e}");
        assert!(
            e.to_string().contains(&format!(" at line {line} column ")),
            "{e}"
        );
    }
    // An entry the file does not hold as it is (it came from a variable) is placed at its
    // list's key rather than at a guess.
    let env = |name: &str| (name == "ORIGIN").then(|| "example.com".to_string());
    let e = Config::from_yaml_str_with_env(
        "gateway:\n  socket:\n    path: /connect\n    allowed_origins:\n      - https://example.com\n      - ${ORIGIN}\n  admin:\n    listen: 127.0.0.1:9000 # example.com\n",
        &env,
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("allowed_origins entry `example.com`"),
        "{e}"
    );
    assert_eq!(e.line(), Some(4), "{e}");
}

/// A key given twice is placed at the second, the one to take out, wherever the section is.
#[test]
fn a_key_given_twice_is_placed_at_the_second() {
    let cases = [
        ("gateway:\n  socket:\n    path: /a\n    heartbeat: 5s\n    path: /b\n", "path", 5),
        (
            "gateway:\n  listen: 127.0.0.1:4000\n  socket: {}\n  limits:\n    max_sockets: 10\n    # a comment\n\n    max_sockets: 20\n",
            "max_sockets",
            8,
        ),
        ("gateway:\n  socket: {}\n  socket: {}\n", "socket", 3),
        // In a list of maps: the item's own second `url`, not the next item's first.
        (
            "gateway:\n  socket:\n    onclose: {publish: c}\n  http_handlers:\n    - url: http://a/x\n      topics: [c]\n      url: http://b/x\n    - url: http://c/x\n      topics: [d]\n",
            "url",
            7,
        ),
    ];
    for (yaml, field, line) in cases {
        let e = bad(yaml);
        assert!(
            e.to_string()
                .contains(&format!("duplicate field `{field}`")),
            "{e}"
        );
        assert_eq!(e.line(), Some(line), "{e}");
    }
}

#[test]
fn origins_a_browser_can_send_are_accepted() {
    for good in [
        "https://app.example.com",
        "HTTPS://App.Example.com",
        "http://localhost:4000",
        "https://app.example.com:443",
        "http://[::1]:8080",
        "http://[::1]",
    ] {
        let yaml = format!("gateway:\n  socket:\n    allowed_origins: [\"{good}\"]\n");
        assert!(Config::from_yaml_str(&yaml).is_ok(), "{good}");
    }
}

#[test]
fn zero_limits_are_rejected() {
    let e = bad("gateway:\n  socket: {}\n  limits:\n    max_sockets: 0\n");
    assert!(e.to_string().contains("at least 1"), "{e}");
    assert_eq!(e.line(), Some(4), "{e}");
    for short in ["0s", "99ms"] {
        let e = bad(&format!(
            "gateway:\n  socket: {{}}\n  limits:\n    max_sockets: 5\n    handshake_timeout: {short}\n"
        ));
        assert!(
            e.to_string()
                .contains("handshake_timeout must be at least 100ms"),
            "{e}"
        );
        assert_eq!(e.line(), Some(5), "{e}");
    }
}

fn bad_origin(origin: &str) -> ConfigError {
    bad(&format!(
        "gateway:\n  socket:\n    allowed_origins: [\"{origin}\"]\n"
    ))
}

#[test]
fn admin_log_and_bus_sections_parse() {
    let c = Config::from_yaml_str(
        r#"
gateway:
  socket: {}
  admin:
    listen: "127.0.0.1:9090"
  log:
    format: json
  bus:
    nats:
      url: "nats://127.0.0.1:4222"
      reply_timeout: 2s
"#,
    )
    .unwrap();
    assert_eq!(c.gateway.admin.unwrap().listen.port(), 9090);
    assert_eq!(c.gateway.log.format, switchboard_config::LogFormat::Json);
    let nats = c.gateway.bus.unwrap().nats;
    assert_eq!(nats.url.as_slice(), ["nats://127.0.0.1:4222"]);
    assert_eq!(nats.reply_timeout, Duration::from_secs(2));
    let d = Config::from_yaml_str("gateway:\n  socket: {}\n").unwrap();
    assert!(d.gateway.admin.is_none() && d.gateway.bus.is_none());
    let e = bad("gateway:\n  socket: {}\n  log:\n    format: xml\n");
    assert!(e.to_string().contains("unknown variant `xml`"), "{e}");
    let e = bad("gateway:\n  socket: {}\n  bus:\n    kafka: {}\n");
    assert!(e.to_string().contains("unknown field `kafka`"), "{e}");
}

fn test_env(name: &str) -> Option<String> {
    match name {
        "ADDR" => Some("0.0.0.0:4100".into()),
        "TOPIC" => Some("chat:say".into()),
        "BEAT" => Some("15s".into()),
        "SIZE" => Some("1MiB".into()),
        "ALG" => Some("HS512".into()),
        "ORIGIN" => Some("https://app.example.com".into()),
        // a value that would break the file if it were pasted into the text
        "TRICKY" => Some("a\"b'c\n  socket: {}\n# d: ${NOT_EXPANDED_AGAIN}".into()),
        _ => None,
    }
}

fn with_env(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_str_with_env(yaml, &test_env)
}

#[test]
fn env_vars_expand_in_string_values_of_every_kind() {
    let c = with_env(
        "gateway:\n  listen: ${ADDR}\n  socket:\n    heartbeat: ${BEAT}\n    max_message_size: \"${SIZE}\"\n    allowed_origins: [\"${ORIGIN}\"]\n    onmessage:\n      types:\n        - { type: \"${TOPIC}\", publish: \"x-${TOPIC}-y\" }\n  auth:\n    algorithm: ${ALG}\n    issuer: ${TRICKY}\n",
    )
    .unwrap();
    let g = &c.gateway;
    assert_eq!(g.listen.to_string(), "0.0.0.0:4100");
    assert_eq!(g.socket.heartbeat, Duration::from_secs(15));
    assert_eq!(g.socket.max_message_size, 1 << 20);
    assert_eq!(
        g.socket.allowed_origins.as_deref(),
        Some(&["https://app.example.com".to_string()][..])
    );
    let route = g
        .socket
        .onmessage
        .as_ref()
        .unwrap()
        .types
        .iter()
        .next()
        .unwrap();
    assert_eq!(route.message_type, "chat:say");
    assert_eq!(route.publish.as_str(), "x-chat:say-y");
    assert_eq!(g.auth.algorithm, Algorithm::HS512);
    // the value is taken as it is: quotes, newlines and `${` inside it change nothing
    assert_eq!(g.auth.issuer.as_deref(), test_env("TRICKY").as_deref());
}

#[test]
fn an_unset_env_var_is_an_error_naming_it_with_its_line() {
    let err = with_env(
        "gateway:\n  socket:\n    path: /x\n  auth:\n    issuer: \"https://${IDP_HOST}/\"\n",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("environment variable `IDP_HOST` is not set"),
        "{text}"
    );
    assert!(text.contains("gateway.auth"), "{text}");
    assert_eq!((err.line(), err.column()), (Some(5), Some(13)), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("socket.yaml");
    std::fs::write(
        &file,
        "gateway:\n  socket:\n    path: /${SWITCHBOARD_TEST_SURELY_UNSET_VAR}\n",
    )
    .unwrap();
    let text = Config::from_file(&file).unwrap_err().to_string();
    assert!(text.starts_with(&file.display().to_string()), "{text}");
    assert!(
        text.contains("`SWITCHBOARD_TEST_SURELY_UNSET_VAR` is not set at line 3"),
        "{text}"
    );
}

#[test]
fn dollar_dollar_brace_is_a_literal_and_keys_and_comments_are_not_expanded() {
    let c = with_env(
        "# ${UNSET_IN_A_COMMENT}\ngateway:\n  socket:\n    path: /a$b\n  auth:\n    issuer: \"$${TOPIC} costs $5\"\n",
    )
    .unwrap();
    assert_eq!(c.gateway.socket.path.as_str(), "/a$b");
    assert_eq!(c.gateway.auth.issuer.as_deref(), Some("${TOPIC} costs $5"));

    let err = bad("gateway:\n  socket:\n    ${TOPIC}: 1\n").to_string();
    assert!(err.contains("unknown field `${TOPIC}`"), "{err}");
    let err = bad("gateway:\n  socket:\n    path: /${oops\n").to_string();
    assert!(err.contains("unterminated `${`"), "{err}");
}

#[test]
fn byte_bounds_gate_and_expiry_parse_with_defaults() {
    let d = Config::from_yaml_str("gateway:\n  socket:\n    onconnect: {publish: c}\n").unwrap();
    let (s, l) = (&d.gateway.socket, &d.gateway.limits);
    assert_eq!((s.send_queue_bytes, l.buffer_budget), (1 << 20, 256 << 20));
    assert_eq!((l.max_handshakes, l.max_handshakes_per_address), (1024, 64));
    assert_eq!(l.max_request_head, 32 << 10);
    assert_eq!(
        s.context_headers,
        ["user-agent", "origin", "x-forwarded-for", "x-request-id"]
    );
    let onconnect = s.onconnect.as_ref().unwrap();
    assert!(!onconnect.gate);
    assert!(d.gateway.auth.close_on_expiry);
    let c = Config::from_yaml_str(
        r#"
gateway:
  socket:
    send_queue_bytes: 64KiB
    context_headers: [X-Tenant, user-agent, x-tenant]
    onconnect: {publish: c, gate: true, gate_timeout: 2s}
  limits:
    buffer_budget: 1GiB
    max_request_head: 8KiB
    max_handshakes: 10
    max_handshakes_per_address: 2
  auth:
    close_on_expiry: false
"#,
    )
    .unwrap();
    let (s, l) = (&c.gateway.socket, &c.gateway.limits);
    assert_eq!((s.send_queue_bytes, l.buffer_budget), (64 << 10, 1 << 30));
    assert_eq!(
        s.context_headers,
        ["x-tenant", "user-agent"],
        "lower case, once each"
    );
    let onconnect = s.onconnect.as_ref().unwrap();
    assert!(onconnect.gate);
    assert_eq!(onconnect.gate_timeout, Duration::from_secs(2));
    assert_eq!((l.max_handshakes, l.max_handshakes_per_address), (10, 2));
    assert!(!c.gateway.auth.close_on_expiry);
}

#[test]
fn reserved_names_and_zero_bounds_are_refused_with_their_line() {
    let e = bad("gateway:\n  socket:\n    onmessage:\n      types:\n        - {type: $refresh, publish: t}\n");
    assert!(e.to_string().contains("`$refresh` is reserved"), "{e}");
    let e = bad("gateway:\n  socket:\n    context_headers: [jwt]\n");
    assert!(
        e.to_string().contains("reserved for the verified claims"),
        "{e}"
    );
    assert_eq!(e.line(), Some(3));
    let e = bad("gateway:\n  socket:\n    context_headers: [\"bad header\"]\n");
    assert!(e.to_string().contains("is not a header name"), "{e}");
    let e = bad("gateway:\n  socket: {}\n  limits:\n    max_handshakes: 0\n");
    assert!(e.to_string().contains("at least 1"), "{e}");
    assert_eq!(e.line(), Some(4));
    let e = bad("gateway:\n  socket: {}\n  limits:\n    buffer_budget: 0\n");
    assert!(e.to_string().contains("at least 1 byte"), "{e}");
    let e = bad("gateway:\n  socket:\n    onclose: {publish: c, gate: true}\n");
    assert!(e.to_string().contains("unknown field `gate`"), "{e}");
}

fn nats(section: &str) -> Result<switchboard_config::NatsConfig, switchboard_config::ConfigError> {
    let env = |name: &str| match name {
        "NATS_PASSWORD" => Some("pw-from-env".to_string()),
        "NATS_SEED" => Some("SUAFAKESEEDFROMENV".to_string()),
        _ => None,
    };
    let text = format!("gateway:\n  socket: {{}}\n  bus:\n    nats:\n{section}");
    Config::from_yaml_str_with_env(&text, &env).map(|c| c.gateway.bus.unwrap().nats)
}

#[test]
fn nats_production_options() {
    use switchboard_config::NatsCredentials;
    let n = nats(
        "      url: [nats://a:4222, \"tls://b:4222\", c:4222]\n      node_name: eu.gw-1\n      \
         auth: {user: gw, password: \"${NATS_PASSWORD}\"}\n      \
         tls: {ca_file: /ca.pem, cert_file: /c.pem, key_file: /k.pem}\n      \
         outbox_bytes: 8MiB\n      max_pending_answers: 1000\n      every_node_bytes: 4MiB\n      \
         handler_bytes: 2MiB\n      gather_quiet: 300ms\n",
    )
    .unwrap();
    assert_eq!(
        n.url.as_slice(),
        ["nats://a:4222", "tls://b:4222", "c:4222"]
    );
    assert_eq!(n.node_name.as_ref().unwrap().as_str(), "eu.gw-1");
    assert_eq!(
        n.auth,
        Some(NatsCredentials::UserPassword {
            user: "gw".into(),
            password: "pw-from-env".into()
        })
    );
    assert!(
        !format!("{n:?}").contains("pw-from-env"),
        "Debug shows no secret"
    );
    let tls = n.tls.unwrap();
    assert_eq!(tls.ca_file.unwrap().to_str(), Some("/ca.pem"));
    assert_eq!(tls.key_file.unwrap().to_str(), Some("/k.pem"));
    assert_eq!((n.outbox_bytes, n.max_pending_answers), (8 << 20, 1000));
    assert_eq!((n.every_node_bytes, n.handler_bytes), (4 << 20, 2 << 20));
    assert_eq!(n.gather_quiet, Duration::from_millis(300));
    let n = nats("      url: \"nats://alice:TopSecret@h:4222\"\n").unwrap();
    assert!(
        !format!("{n:?}").contains("TopSecret"),
        "Debug shows no password: {n:?}"
    );
    // Credentials in a URL count as `auth`: not both, and not two different ones.
    for (section, says, line) in [
        (
            "      url: \"nats://alice:pw@h:4222\"\n      auth: {user: bob, password: pw2}\n",
            "given both in a server URL and in auth",
            6,
        ),
        (
            "      url: [\"nats://alice:pw@h:4222\", \"nats://alice:other@h:4223\"]\n",
            "different credentials",
            5,
        ),
    ] {
        let e = nats(section).unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert!(!e.to_string().contains(":pw"), "{e}");
        assert_eq!(e.line(), Some(line), "{e}");
    }
    nats("      url: [\"nats://alice:pw@h:4222\", \"alice:pw@h:4223\", h:4224]\n").unwrap();
    // A password may hold a `/`; an empty `@` is no credentials (so `auth` may be given).
    nats("      url: \"nats://alice:pa/ss@h:4222\"\n").unwrap();
    nats("      url: \"nats://@h:4222\"\n      auth: {token: t}\n").unwrap();
    // Placed at the key's own line, not at the section's first key.
    for bad in ["0s", "2s"] {
        let e = nats(&format!(
            "      url: nats://a:4222\n      gather_quiet: {bad}\n"
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("gather_quiet must be more than 0 and at most 1s"),
            "{e}"
        );
        assert_eq!(e.line(), Some(6), "{e}");
    }
    let n = nats("      url: nats://a:4222\n      auth: {nkey_seed: \"${NATS_SEED}\"}\n").unwrap();
    assert_eq!(
        n.auth,
        Some(NatsCredentials::NKeySeed("SUAFAKESEEDFROMENV".into()))
    );
    assert!(n.node_name.is_none() && n.tls.is_none());
    assert_eq!(n.outbox_bytes, 64 << 20);
    assert_eq!(n.gather_quiet, Duration::from_millis(50));
    for (auth, kind) in [
        ("{token: t0k}", NatsCredentials::Token("t0k".into())),
        (
            "{creds_file: /gw.creds}",
            NatsCredentials::CredsFile("/gw.creds".into()),
        ),
    ] {
        let n = nats(&format!("      url: nats://a:4222\n      auth: {auth}\n")).unwrap();
        assert_eq!(n.auth, Some(kind));
    }
}

#[test]
fn nats_option_errors_name_the_key_and_line() {
    for (name, line) in [
        ("\"gw.*\"", "gw.*"),
        ("\"gw 1\"", "gw 1"),
        ("\"a..b\"", "a..b"),
        ("\">\"", ">"),
        ("\"\"", ""),
    ] {
        let e = nats(&format!(
            "      url: nats://a:4222\n      node_name: {name}\n"
        ))
        .unwrap_err();
        let text = e.to_string();
        // serde_yaml places a custom error at its section; the message names the key, and
        // the error is placed again at the key's line.
        assert!(text.starts_with("gateway.bus.nats: "), "{text}");
        assert!(
            text.contains(&format!("node_name `{line}` must be")),
            "{text}"
        );
        assert_eq!(e.line(), Some(6), "{text}");
    }
    let cases = [
        ("      url: []\n", "at least one server"),
        ("      url: \"http://a:80\"\n", "url `http://a:80` must be"),
        // A port the client would refuse at start, and never the password in the message.
        (
            "      url: \"nats://alice:TopSecret@127.0.0.1:99999\"\n",
            "url `nats://***@127.0.0.1:99999` must be",
        ),
        (
            "      url: \"nats://alice:Top/Secret@127.0.0.1:99999\"\n",
            "url `nats://***@127.0.0.1:99999` must be",
        ),
        ("      url: \"nats://h:0\"\n", "a port from 1 to 65535"),
        ("      url: \"nats://:4222\"\n", "must be nats://host:port"),
        (
            "      url: [h:4222, \"[::1]:x\"]\n",
            "url `[::1]:x` must be",
        ),
        ("      url: {a: 1}\n", "string or a list"),
        (
            "      url: a\n      auth: {user: gw}\n",
            "auth.user needs auth.password",
        ),
        (
            "      url: a\n      auth: {password: pw}\n",
            "auth.password needs auth.user",
        ),
        (
            "      url: a\n      auth: {token: t, nkey_seed: SUX}\n",
            "exactly one of",
        ),
        ("      url: a\n      auth: {}\n", "exactly one of"),
        ("      url: a\n      auth: {nkey_seed: UABC}\n", "user seed"),
        (
            "      url: a\n      auth: {passwd: x}\n",
            "unknown field `passwd`",
        ),
        (
            "      url: a\n      tls: {cert_file: /c.pem}\n",
            "go together",
        ),
        ("      url: a\n      max_pending_answers: 0\n", "at least 1"),
        (
            "      url: a\n      auth: {token: \"${NOPE}\"}\n",
            "`NOPE` is not set",
        ),
    ];
    for (section, want) in cases {
        let e = nats(section).unwrap_err().to_string();
        assert!(e.contains(want), "{section}: {e}");
        assert!(!e.contains("TopSecret"), "{e}");
        assert!(e.contains("gateway.bus.nats"), "{section}: {e}");
        assert!(e.contains("line "), "{section}: {e}");
    }
}

#[test]
fn the_tls_section_parses_and_its_errors_name_the_key_and_line() {
    let c = Config::from_yaml_str(
        "gateway:\n  socket: {}\n  tls:\n    cert_file: /c.pem\n    key_file: /k.pem\n    min_version: 1.3\n  api:\n    listen: 127.0.0.1:4002\n    tls: false\n",
    )
    .unwrap();
    let tls = c.gateway.tls.unwrap();
    assert_eq!(tls.cert_file.to_str(), Some("/c.pem"));
    assert_eq!(tls.min_version, switchboard_config::TlsVersion::Tls13);
    assert_eq!(tls.reload_interval, Duration::from_secs(10));
    assert!(!c.gateway.api.unwrap().tls);
    let quoted = Config::from_yaml_str(
        "gateway:\n  socket: {}\n  tls:\n    cert_file: a\n    key_file: b\n    min_version: \"1.2\"\n",
    )
    .unwrap();
    assert_eq!(
        quoted.gateway.tls.unwrap().min_version,
        switchboard_config::TlsVersion::Tls12
    );

    let e = bad(
        "gateway:\n  socket: {}\n  tls:\n    cert_file: a\n    key_file: b\n    min_version: 1.1\n",
    );
    assert!(e.to_string().contains("min_version must be"), "{e}");
    assert_eq!(e.line(), Some(6));
    let e = bad("gateway:\n  socket: {}\n  tls:\n    cert_file: a\n");
    assert!(e.to_string().contains("missing field `key_file`"), "{e}");
    assert_eq!(e.line(), Some(4));
}

/// A config whose socket publishes `socket:connection`, `chat:say` and `socket:close`, with
/// `handlers` as the `http_handlers` list (lines indented by four spaces).
fn with_handlers(handlers: &str) -> Result<Config, ConfigError> {
    Config::from_yaml_str_with_env(
        &format!(
            "gateway:\n  socket:\n    onconnect: {{publish: socket:connection}}\n    onmessage:\n      types: [{{type: chat.say, publish: \"chat:say\"}}]\n    onclose: {{publish: socket:close}}\n    send: {{subscribe: socket:send}}\n  http_handlers:\n{handlers}"
        ),
        &|_| None,
    )
}

#[test]
fn http_handlers_bind_topics_with_defaults() {
    let c = with_handlers(
        "    - url: http://127.0.0.1:8081/events\n      topics: [socket:connection, \"chat:say\"]\n      pass_headers: [X-Request-Id]\n",
    )
    .unwrap();
    let h = c.gateway.http_handlers.for_topic("chat:say").unwrap();
    assert_eq!(h.url.as_str(), "http://127.0.0.1:8081/events");
    assert_eq!(h.label(), "127.0.0.1:8081");
    assert_eq!(h.timeout, Duration::from_secs(10));
    assert_eq!((h.concurrency, h.queue, h.per_socket), (32, 256, 16));
    assert_eq!(
        h.per_user, None,
        "absent: the endpoint works out half its room"
    );
    assert_eq!(h.max_response, 64 * 1024);
    assert_eq!(h.secret_env, "SWITCHBOARD_HANDLER_SECRET");
    assert_eq!(h.pass_headers, ["x-request-id"]);
    assert_eq!(h.onclose_retries, 2);
    assert!(c.gateway.http_handlers.for_topic("socket:close").is_none());
}

#[test]
fn http_handler_errors_name_the_key_and_line() {
    let entry = "    - url: http://h:1/\n      topics: [socket:connection]\n";
    for (extra, expect, line) in [
        // serde_yaml places a custom error at its list entry; the message names the key, and
        // the error is placed again at the key's line
        (
            "      concurrency: 0\n",
            "concurrency must be between 1 and 4096",
            11,
        ),
        (
            "      concurrency: 100000\n",
            "concurrency must be between 1 and 4096",
            11,
        ),
        ("      timeout: 30days\n", "timeout must be at most 1h", 11),
        (
            "      queue: 99999999\n",
            "queue must be at most 1000000",
            11,
        ),
        // A list's entry: its own line.
        ("      pass_headers: [cookie]\n", "carries credentials", 11),
        (
            "      pass_headers: [Host]\n",
            "`host` is set by the gateway itself",
            11,
        ),
        (
            "      onclose_retries: 11\n",
            "onclose_retries must be at most 10",
            11,
        ),
        // A value the field's own parser refuses: its own line.
        ("      timeout: soon\n", "invalid duration `soon`", 11),
        (
            "      per_user: 0\n",
            "per_user must be between 1 and 1004096",
            11,
        ),
        ("      zz: 1\n", "unknown field `zz`", 11),
    ] {
        let e = with_handlers(&format!("{entry}{extra}")).unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("gateway.http_handlers"), "{text}");
        assert!(text.contains(expect), "{text}");
        assert_eq!(e.line(), Some(line), "{text}");
    }
    // In the second entry, below a comment: that entry's key, not the first entry's.
    let e = with_handlers(
        "    - url: http://h:1/\n      topics: [socket:connection]\n      concurrency: 4\n    \
         - url: http://h:2/\n      topics: [socket:close]\n      # slow\n      concurrency: 0\n",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("gateway.http_handlers[1]: concurrency"),
        "{e}"
    );
    assert_eq!(e.line(), Some(15), "{e}");
    for (url, expect) in [
        ("ftp://h/", "must start with http:// or https://"),
        ("http://user:pw@h/", "must not carry credentials"),
        ("ftp://user:pw@h/", "`ftp://***@h/` must start with"),
        ("http:///x", "has no host"),
    ] {
        let e = with_handlers(&format!(
            "    - url: \"{url}\"\n      topics: [socket:close]\n"
        ))
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains(expect), "{text}");
        assert!(!text.contains(":pw@"), "no password shown: {text}");
        assert_eq!(e.line(), Some(9), "{text}");
    }
    // A topic bound twice, across entries: placed at the later entry.
    let e = with_handlers(&format!("{entry}{entry}")).unwrap_err();
    assert!(
        e.to_string()
            .contains("entry 2: topic `socket:connection` is already bound by entry 1"),
        "{e}"
    );
    assert_eq!(e.line(), Some(11), "{e}");
    // The same name twice (the URL's host, when `name` is left out), after a comment.
    let e = with_handlers(
        "    - url: http://h:1/a\n      topics: [socket:connection]\n    # another\n    \
         - url: http://h:1/b\n      topics: [socket:close]\n",
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("entry 2 has the same name `h:1` as entry 1"),
        "{e}"
    );
    assert_eq!(e.line(), Some(12), "{e}");
    // A topic no hook publishes (a typo, or the send topic): the entry's line.
    let e = with_handlers("    - url: http://h:1/\n      topics:\n        - socket:connection\n        - socket:send\n").unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("http_handlers[0].topics: topic `socket:send` is not published"),
        "{text}"
    );
    assert_eq!(e.line(), Some(12), "{text}");
}

#[test]
fn an_sse_path_equal_to_the_socket_path_is_refused_at_its_line() {
    // Was accepted here (and by `check-config`), then refused by `serve` with exit 1.
    let e = bad("gateway:\n  socket:\n    path: /c\n    sse:\n      path: /c\n");
    let text = e.to_string();
    assert!(text.starts_with("gateway.socket.sse.path: `/c`"), "{e}");
    assert!(text.contains("leave the key out for `/c/sse`"), "{e}");
    assert_eq!(e.line(), Some(5), "{e}");
    // In flow style, the line of the section that holds it; with the default socket path too.
    let e = bad("gateway:\n  socket:\n    sse: {path: /connect}\n");
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(Config::from_yaml_str("gateway:\n  socket:\n    sse: {path: /c}\n").is_ok());
}

#[test]
fn two_listeners_on_one_address_are_refused_naming_both_keys() {
    // Was accepted; `serve` then stopped with "address in use" for its own config.
    let e = bad(
        "gateway:\n  listen: 127.0.0.1:4601\n  socket: {}\n  admin:\n    listen: 127.0.0.1:4601\n",
    );
    let text = e.to_string();
    assert!(
        text.starts_with(
            "gateway.admin.listen: 127.0.0.1:4601 is also the address of gateway.listen"
        ),
        "{e}"
    );
    assert_eq!(e.line(), Some(5), "{e}");
    // The default gateway.listen, a wildcard address, the API against the admin listener.
    let e = bad("gateway:\n  socket: {}\n  api: {listen: \"0.0.0.0:4000\"}\n");
    assert!(text_has(
        &e,
        "gateway.api.listen: 0.0.0.0:4000 is also the address of gateway.listen"
    ));
    assert_eq!(e.line(), Some(3), "{e}");
    let e = bad(
        "gateway:\n  socket: {}\n  admin:\n    listen: 127.0.0.1:9000\n  api:\n    # here\n    listen: 127.0.0.1:9000\n",
    );
    assert!(text_has(&e, "is also the address of gateway.admin.listen"));
    assert_eq!(e.line(), Some(7), "{e}");
    // Named at the key written later in the file, whatever the section order; the default
    // gateway.listen is said to be one.
    let e = bad(
        "gateway:\n  socket: {}\n  api:\n    listen: 127.0.0.1:9000\n  admin:\n    listen: 127.0.0.1:9000\n",
    );
    assert!(text_has(
        &e,
        "gateway.admin.listen: 127.0.0.1:9000 is also the address of gateway.api.listen: each"
    ));
    assert_eq!(e.line(), Some(6), "{e}");
    let e = bad("gateway:\n  socket: {}\n  admin: {listen: \"127.0.0.1:4000\"}\n");
    assert!(text_has(
        &e,
        "gateway.admin.listen: 127.0.0.1:4000 is also the address of gateway.listen (its default)"
    ));
    // `gateway` in flow style: its listen is written, not the default.
    let e = bad(
        "gateway: {listen: \"127.0.0.1:4000\", socket: {}, admin: {listen: \"127.0.0.1:4000\"}}\n",
    );
    assert!(text_has(
        &e,
        "127.0.0.1:4000 is also the address of gateway.listen: each"
    ));
    // `[::]` takes the port on every address, IPv4 included (Linux's default); an
    // IPv4-mapped address is its IPv4 one.
    for (listen, other) in [
        ("\"[::]:4600\"", "0.0.0.0:4600"),
        ("\"[::]:4600\"", "127.0.0.1:4600"),
        ("127.0.0.1:4600", "\"[::]:4600\""),
        ("127.0.0.1:4600", "\"[::ffff:127.0.0.1]:4600\""),
        ("\"[::1]:4600\"", "\"[::]:4600\""),
    ] {
        let e = bad(&format!(
            "gateway:\n  listen: {listen}\n  socket: {{}}\n  admin:\n    listen: {other}\n"
        ));
        assert!(text_has(&e, "is also the address of gateway.listen:"));
    }
    // Port 0 (any free port), other ports and other addresses are fine.
    for ok in [
        "gateway:\n  listen: 127.0.0.1:0\n  socket: {}\n  admin: {listen: 127.0.0.1:0}\n  api: {listen: 127.0.0.1:0}\n",
        "gateway:\n  socket: {}\n  admin: {listen: 127.0.0.1:9090}\n  api: {listen: 127.0.0.1:9091}\n",
        "gateway:\n  socket: {}\n  admin: {listen: 127.0.0.2:4000}\n",
        "gateway:\n  listen: \"[::1]:4000\"\n  socket: {}\n  admin: {listen: 127.0.0.1:4000}\n",
        "gateway:\n  listen: 0.0.0.0:4000\n  socket: {}\n  admin: {listen: \"[::1]:4000\"}\n",
    ] {
        assert!(Config::from_yaml_str(ok).is_ok(), "{ok}");
    }
}

fn text_has(e: &ConfigError, needle: &str) -> bool {
    let text = e.to_string();
    assert!(text.contains(needle), "{text}");
    true
}

#[test]
fn a_variable_name_key_must_hold_a_name_and_the_error_does_not_echo_it() {
    // An empty name, or a value where the name goes (`"${SECRET}"` expands to the secret):
    // was accepted, then `serve` said "environment variable <the value> is not set".
    let secret = "s3cr3t-value==";
    let env = |name: &str| (name == "JWT").then(|| secret.to_string());
    for (yaml, key, line) in [
        (
            "gateway:\n  socket: {}\n  auth:\n    secret_env: \"${JWT}\"\n",
            "auth.secret_env",
            4,
        ),
        (
            "gateway:\n  socket: {}\n  auth:\n    secret_env: \"\"\n",
            "auth.secret_env",
            4,
        ),
        (
            "gateway:\n  socket: {}\n  api:\n    listen: 127.0.0.1:9\n    key_env: \"${JWT}\"\n",
            "gateway.api.key_env",
            5,
        ),
        (
            "gateway:\n  socket: {onclose: {publish: c}}\n  http_handlers:\n    - url: http://127.0.0.1:9/\n      topics: [c]\n      secret_env: \"A=B\"\n",
            "gateway.http_handlers[0].secret_env",
            6,
        ),
    ] {
        let e = Config::from_yaml_str_with_env(yaml, &env).expect_err(yaml);
        let text = e.to_string();
        assert!(text.contains(key), "{text}");
        assert!(text.contains("must name an environment variable"), "{text}");
        assert!(!text.contains(secret), "{text}");
        assert_eq!(e.line(), Some(line), "{text}");
    }
    let ok = "gateway:\n  socket: {}\n  auth:\n    secret_env: _MY_SECRET_2\n";
    assert!(Config::from_yaml_str(ok).is_ok());
}

#[test]
fn a_listen_address_error_says_what_is_wanted() {
    let e = bad("gateway:\n  socket: {}\n  admin:\n    listen: \"localhost:9090\"\n");
    let text = e.to_string();
    assert!(
        text.starts_with("gateway.admin.listen: `localhost:9090` is not an address to listen on"),
        "{text}"
    );
    assert!(text.contains("host names are not looked up"), "{text}");
    assert_eq!(e.line(), Some(4), "{text}");
}

#[test]
fn a_tab_in_the_indentation_is_named_as_the_cause() {
    let e = bad("gateway:\n\tsocket: {}\n");
    let text = e.to_string();
    assert!(
        text.contains("line 2 is indented with a tab: YAML indents with spaces only"),
        "{text}"
    );
    assert_eq!(e.line(), Some(2), "{text}");
}

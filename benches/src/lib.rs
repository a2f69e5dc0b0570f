//! Switchboard's benchmarks: the pieces shared by the load benchmark's server
//! (`bench-server`), its load generator (`bench-client`) and the criterion micro-benchmarks.
//!
//! Nobody should depend on this crate; `cargo xtask bench` drives it. The load benchmark runs
//! one client against Switchboard and its peers (`benches/peers/ws-node`, `uws-node`), which
//! all speak the same JSON:
//!
//! - client → server: `{"type":"echo","payload":P}`, `{"type":"send","to":U,"payload":P}`,
//!   `{"type":"broadcast","payload":P}`;
//! - server → client: `{"type":"bench:echo","payload":P}` (the echo handler's reply),
//!   `{"type":"bench.send","payload":P}` (to every socket of user `U`),
//!   `{"type":"bench.broadcast","payload":P}` (to every socket).
//!
//! `P` is a string of [`wire::DEFAULT_PAYLOAD`] bytes whose first [`wire::STAMP_LEN`] bytes
//! are a hex stamp (send time, sequence number, sender), so the client measures latency
//! from the frame alone, whichever socket it arrives on.

pub mod client;
pub mod frames;
pub mod procfs;
pub mod stats;
pub mod wire;

/// The environment variable holding the HS256 secret, for every server and the client.
pub const SECRET_ENV: &str = "SWITCHBOARD_JWT_SECRET";
/// The secret `cargo xtask bench` uses when [`SECRET_ENV`] is unset (a benchmark, not a
/// deployment: it only ever signs tokens for loopback servers).
pub const DEFAULT_SECRET: &str = "switchboard-bench-secret-not-for-production";
/// The upgrade path of every bench server.
pub const PATH: &str = "/connect";
/// The namespace every bench socket asks for.
pub const NAMESPACE: &str = "bench";
/// The JWT claim holding the username.
pub const USERNAME_CLAIM: &str = "preferred_username";

/// The bench server's config: HS256 with the secret in [`SECRET_ENV`], one topic per bench
/// message type, and the built-in `send` and `broadcast` subscribers. The listen address is
/// chosen by the server (`start_on`), not here.
pub fn server_yaml() -> String {
    format!(
        r#"gateway:
  socket:
    path: "{PATH}"
    heartbeat: 30s
    max_message_size: 64KiB
    send_queue: 256
    onmessage:
      types:
        - {{ type: "echo", publish: "bench:echo" }}
        - {{ type: "send", publish: "bench:send" }}
        - {{ type: "broadcast", publish: "bench:broadcast" }}
    send: {{ subscribe: "socket:send" }}
    broadcast: {{ subscribe: "socket:broadcast" }}
  auth:
    cookie: ID_TOKEN
    username_claim: {USERNAME_CLAIM}
    algorithm: HS256
    secret_env: {SECRET_ENV}
"#
    )
}

/// Mints an HS256 token for `username`, valid for `ttl_secs` seconds.
pub fn mint_token(secret: &str, username: &str, ttl_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = serde_json::json!({
        USERNAME_CLAIM: username,
        "iat": now,
        "exp": now + ttl_secs,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    // HS256 over a JSON object cannot fail to encode.
    .expect("an HS256 token")
}

/// `RESULT k=v k=v ...`: the one line of a client run that `cargo xtask bench` reads.
pub fn result_line(pairs: &[(&str, String)]) -> String {
    let mut line = String::from("RESULT");
    for (k, v) in pairs {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(v);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_config_is_valid_and_routes_the_bench_types() {
        std::env::set_var(SECRET_ENV, DEFAULT_SECRET);
        let config = switchboard::Config::from_yaml_str(&server_yaml()).unwrap();
        let socket = &config.gateway.socket;
        let types: Vec<_> = socket
            .onmessage
            .as_ref()
            .unwrap()
            .types
            .iter()
            .map(|t| (t.message_type.clone(), t.publish.to_string()))
            .collect();
        assert_eq!(types.len(), 3);
        assert_eq!(
            socket.send.as_ref().unwrap().subscribe.as_str(),
            "socket:send"
        );
        assert!(switchboard::Container::new(config).is_ok());
    }

    #[test]
    fn tokens_have_three_parts_and_the_username() {
        let t = mint_token(DEFAULT_SECRET, "user-7", 60);
        assert_eq!(t.split('.').count(), 3);
        let key = jsonwebtoken::DecodingKey::from_secret(DEFAULT_SECRET.as_bytes());
        let v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        let data = jsonwebtoken::decode::<serde_json::Value>(&t, &key, &v).unwrap();
        assert_eq!(data.claims[USERNAME_CLAIM], "user-7");
    }

    #[test]
    fn result_lines_are_key_value_pairs() {
        assert_eq!(
            result_line(&[("rate", "1.5".into()), ("errors", "0".into())]),
            "RESULT rate=1.5 errors=0"
        );
    }
}

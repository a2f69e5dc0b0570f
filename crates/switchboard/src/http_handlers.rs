//! `gateway.http_handlers`: the config's bindings turned into the dispatcher's endpoints
//! (`switchboard-http-handlers`), with their secrets read from the environment.

use std::collections::HashMap;
use std::sync::Arc;

use switchboard_config::Config;
use switchboard_core::http::{HeaderName, Uri};
use switchboard_http_handlers::{EndpointOptions, HttpHandlers, MIN_SECRET};

/// Starts the endpoints the config binds, or `None` when it binds none. `secrets` are values
/// given with [`crate::Container::http_handler_secret`], by variable name; other variables
/// are read from the environment.
pub(crate) fn start(
    config: &Config,
    secrets: &HashMap<String, Vec<u8>>,
) -> Result<Option<Arc<HttpHandlers>>, String> {
    let bindings = &config.gateway.http_handlers;
    if bindings.is_empty() {
        return Ok(None);
    }
    let mut endpoints = Vec::new();
    for (i, h) in bindings.iter().enumerate() {
        let key = |k: &str| format!("gateway.http_handlers[{i}].{k}");
        let url: Uri = h
            .url
            .as_str()
            .parse()
            .map_err(|e| format!("{}: {e}", key("url")))?;
        let secret = match secrets.get(&h.secret_env) {
            Some(s) => s.clone(),
            None => std::env::var(&h.secret_env)
                .unwrap_or_default()
                .into_bytes(),
        };
        if secret.len() < MIN_SECRET {
            return Err(format!(
                "{}: the environment variable `{}` must hold the signing secret (at least \
                 {MIN_SECRET} bytes)",
                key("secret_env"),
                h.secret_env
            ));
        }
        let topics = h.topics.iter().map(|t| t.as_str().to_string()).collect();
        let mut e = EndpointOptions::new(&h.label(), url, topics, secret);
        e.timeout = h.timeout;
        e.concurrency = h.concurrency;
        e.queue = h.queue;
        e.queue_bytes = h.queue_bytes;
        e.per_socket = h.per_socket;
        e.per_user = h.per_user;
        e.max_response = h.max_response;
        e.ca_file.clone_from(&h.ca_file);
        e.onclose_retries = h.onclose_retries;
        e.retry_backoff = h.retry_backoff;
        e.pass_headers = h
            .pass_headers
            .iter()
            // The config crate checked that each is a header name.
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        endpoints.push(e);
    }
    HttpHandlers::start(endpoints)
        .map(|h| Some(Arc::new(h)))
        .map_err(|e| e.to_string())
}

/// The headers each socket keeps for its events: `socket.context_headers`, and the
/// `pass_headers` of every endpoint (they travel in `context.headers`).
pub(crate) fn kept_headers(config: &Config) -> Vec<HeaderName> {
    let mut names: Vec<&str> = config
        .gateway
        .socket
        .context_headers
        .iter()
        .map(String::as_str)
        .collect();
    for h in config.gateway.http_handlers.iter() {
        for name in &h.pass_headers {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    names
        .into_iter()
        // The config crate checked that each is a header name.
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect()
}

//! `switchboard_config::Config::from_yaml_str` on arbitrary text: it must never panic, every
//! refusal has a message, and every config it accepts keeps the documented limits
//! (docs/CONFIG.md).

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use switchboard_config::Config;

fuzz_target!(|text: &str| {
    match Config::from_yaml_str(text) {
        Ok(config) => {
            let s = &config.gateway.socket;
            assert!(s.path.as_str().starts_with('/'), "path {:?}", s.path);
            assert!(
                !s.path.as_str().contains(['?', '#', ' ']),
                "path {:?}",
                s.path
            );
            assert!(s.send_queue >= 1, "send_queue 0");
            assert!(s.max_message_size >= 1, "max_message_size 0");
            assert!(
                s.heartbeat >= Duration::from_millis(10),
                "heartbeat {:?}",
                s.heartbeat
            );
            let mut topics: Vec<&str> = Vec::new();
            topics.extend(s.onconnect.iter().map(|h| h.publish.as_str()));
            topics.extend(s.onclose.iter().map(|h| h.publish.as_str()));
            topics.extend(s.send.iter().map(|h| h.subscribe.as_str()));
            topics.extend(s.broadcast.iter().map(|h| h.subscribe.as_str()));
            if let Some(m) = &s.onmessage {
                topics.extend(m.publish.iter().map(|t| t.as_str()));
                let types: Vec<&str> = m.types.iter().map(|r| r.message_type.as_str()).collect();
                for (i, t) in types.iter().enumerate() {
                    assert!(!types[..i].contains(t), "duplicate type {t:?} accepted");
                }
                topics.extend(m.types.iter().map(|r| r.publish.as_str()));
            }
            for topic in topics {
                assert!(!topic.trim().is_empty(), "blank topic accepted");
            }
            let auth = &config.gateway.auth;
            assert!(!auth.cookie.is_empty(), "empty cookie name accepted");
            assert!(
                !auth.username_claim.is_empty(),
                "empty username claim accepted"
            );
            assert_eq!(
                auth.algorithm.is_hmac(),
                auth.public_key_file.is_none(),
                "key file given for HS* or missing for RS*/ES*"
            );
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.trim().is_empty(), "empty error message: {e:?}");
            if let Some(line) = e.line() {
                assert!(line >= 1, "line {line} in {message:?}");
            }
            if let Some(column) = e.column() {
                assert!(column >= 1, "column {column} in {message:?}");
            }
        }
    }
});

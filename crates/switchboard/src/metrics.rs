//! Prometheus metrics (`prometheus-client`).
//!
//! Two kinds:
//! - live series the gateway updates as things happen: messages in and out by topic, reply
//!   latency by topic, error frames by kind. Their handles are made once per topic (the
//!   configured topics when the container is built; anything else shares `topic="(other)"`,
//!   which caps the label's cardinality), so the hot path does an atomic add and no allocation;
//! - series read at scrape time from the counters the gateway and the transport keep anyway
//!   ([`crate::Stats`]) and from the registry (sockets open, by namespace, top N).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry as PromRegistry;
use switchboard_core::SocketRef;
use switchboard_registry::Registry;

use crate::admin::Readiness;
use crate::transports::Transports;

use crate::stats::GatewayStats;

/// The `topic` label value shared by topics that are not in the config.
pub(crate) const OTHER: &str = "(other)";

type TopicLabel = [(&'static str, String); 1];
type KindLabel = [(&'static str, &'static str); 1];

/// Upper bounds of the reply latency buckets, in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

struct Families {
    messages_in: Family<TopicLabel, Counter>,
    messages_out: Family<TopicLabel, Counter>,
    reply_latency: Family<TopicLabel, Histogram, fn() -> Histogram>,
    error_frames: Family<KindLabel, Counter>,
}

/// The series of one topic, created on first use and then cached.
pub(crate) struct TopicMetrics {
    label: TopicLabel,
    families: Arc<Families>,
    messages_in: OnceLock<Counter>,
    messages_out: OnceLock<Counter>,
    reply_latency: OnceLock<Histogram>,
}

impl TopicMetrics {
    fn new(topic: &str, families: &Arc<Families>) -> Self {
        TopicMetrics {
            label: [("topic", topic.to_string())],
            families: families.clone(),
            messages_in: OnceLock::new(),
            messages_out: OnceLock::new(),
            reply_latency: OnceLock::new(),
        }
    }

    /// Socket messages published on this topic.
    pub(crate) fn messages_in(&self) -> &Counter {
        self.messages_in
            .get_or_init(|| self.families.messages_in.get_or_create_owned(&self.label))
    }

    /// Frames queued to sockets because of this topic (replies, `send`, `broadcast`).
    pub(crate) fn messages_out(&self) -> &Counter {
        self.messages_out
            .get_or_init(|| self.families.messages_out.get_or_create_owned(&self.label))
    }

    /// Time from publishing a socket's message on this topic to each handler's answer.
    pub(crate) fn reply_latency(&self) -> &Histogram {
        self.reply_latency
            .get_or_init(|| self.families.reply_latency.get_or_create_owned(&self.label))
    }
}

/// Error frames sent to sockets, by why.
pub(crate) struct ErrorFrames {
    /// Not JSON, not an object with a string `type`, binary.
    pub(crate) bad_message: Counter,
    /// The first refusal of a run over the rate limit.
    pub(crate) rate_limited: Counter,
    /// `msg.fail` (by a handler, a delivery subscriber, or the gateway when a publish fails).
    pub(crate) fail: Counter,
    /// A handler returned an error or panicked.
    pub(crate) handler_error: Counter,
    /// A `$refresh` refused (bad token, too frequent, or not this socket's).
    pub(crate) refresh: Counter,
}

/// The gateway's live metrics; shared by the gateway, the delivery subscribers and the
/// scrape endpoint.
pub(crate) struct Metrics {
    families: Arc<Families>,
    // Looked up per reply and delivery: foldhash, not SipHash (the keys come from the config).
    topics: foldhash::HashMap<Arc<str>, TopicMetrics>,
    other: TopicMetrics,
    pub(crate) errors: ErrorFrames,
}

impl Metrics {
    /// Metrics with handles for `topics` (the config's); other topics share `(other)`.
    pub(crate) fn new<'a>(topics: impl IntoIterator<Item = &'a str>) -> Self {
        let families = Arc::new(Families {
            messages_in: Family::default(),
            messages_out: Family::default(),
            reply_latency: Family::new_with_constructor(latency_histogram),
            error_frames: Family::default(),
        });
        let kind = |k: &'static str| families.error_frames.get_or_create_owned(&[("kind", k)]);
        let errors = ErrorFrames {
            bad_message: kind("bad_message"),
            rate_limited: kind("rate_limited"),
            fail: kind("fail"),
            handler_error: kind("handler_error"),
            refresh: kind("refresh"),
        };
        let topics = topics
            .into_iter()
            .map(|t| (Arc::from(t), TopicMetrics::new(t, &families)))
            .collect();
        Metrics {
            other: TopicMetrics::new(OTHER, &families),
            families,
            topics,
            errors,
        }
    }

    /// The series of `topic`, or the shared `(other)` ones for a topic not in the config.
    pub(crate) fn topic(&self, topic: &str) -> &TopicMetrics {
        self.topics.get(topic).unwrap_or(&self.other)
    }

    /// A registry with every series: the live ones and the scrape-time `collector`.
    pub(crate) fn registry(&self, collector: Scraped) -> PromRegistry {
        let mut r = PromRegistry::default();
        let f = &self.families;
        r.register(
            "switchboard_messages_in",
            "Messages from sockets published on a topic (a message routed by type counts on both of its topics)",
            f.messages_in.clone(),
        );
        r.register(
            "switchboard_messages_out",
            "Frames queued to sockets because of a topic: handler replies and send/broadcast deliveries (one per recipient socket)",
            f.messages_out.clone(),
        );
        r.register(
            "switchboard_reply_latency_seconds",
            "Time from publishing a socket's message to a handler's reply or fail reaching the gateway",
            f.reply_latency.clone(),
        );
        r.register(
            "switchboard_error_frames",
            "Error frames sent to sockets, by kind (bad_message, rate_limited, fail, handler_error, refresh)",
            f.error_frames.clone(),
        );
        r.register_collector(Box::new(collector));
        r
    }
}

/// Series read at scrape time.
pub(crate) struct Scraped {
    pub(crate) gateway: Arc<GatewayStats>,
    pub(crate) transports: Arc<Transports>,
    pub(crate) registry: Arc<Registry<SocketRef>>,
    pub(crate) readiness: Readiness,
    pub(crate) top_namespaces: usize,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped")
            .field("top_namespaces", &self.top_namespaces)
            .finish_non_exhaustive()
    }
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(m)
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(m)
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The label of sockets without a namespace in `switchboard_sockets_open_by_namespace`.
const NO_NAMESPACE: &str = "(none)";

/// The `top` namespaces with the most sockets, largest first (ties by name), then the sum of
/// the rest. A namespace a client named like one of the gauge's own labels (`(other)`,
/// `(none)`) is never a series of its own, which would repeat that label: it counts in the
/// rest.
pub(crate) fn top_namespaces(
    mut counts: Vec<(Arc<str>, usize)>,
    top: usize,
) -> (Vec<(Arc<str>, usize)>, usize) {
    let mut named_like_a_label = 0;
    counts.retain(|(ns, n)| {
        let own = &**ns != OTHER && &**ns != NO_NAMESPACE;
        if !own {
            named_like_a_label += n;
        }
        own
    });
    let by_size = |a: &(Arc<str>, usize), b: &(Arc<str>, usize)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    let rest = named_like_a_label
        + if counts.len() > top {
            counts.select_nth_unstable_by(top, by_size);
            counts.split_off(top).iter().map(|c| c.1).sum::<usize>()
        } else {
            0
        };
    counts.sort_unstable_by(by_size);
    (counts, rest)
}

impl Collector for Scraped {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let t = self.transports.counters();
        let g = self.gateway.snapshot(t);
        let open = self.registry.len();
        gauge(
            &mut e,
            "switchboard_sockets_open",
            "Sockets open now.",
            as_i64(open),
        )?;
        {
            let counts = self.registry.namespace_counts();
            let in_namespaces: usize = counts.iter().map(|c| c.1).sum();
            let (top, other) = top_namespaces(counts, self.top_namespaces);
            let mut m = e.encode_descriptor(
                "switchboard_sockets_open_by_namespace",
                "Sockets open now by namespace: the namespaces with the most sockets, the rest summed as (other), sockets without one as (none).",
                None,
                MetricType::Gauge,
            )?;
            for (ns, n) in &top {
                ConstGauge::new(as_i64(*n)).encode(m.encode_family(&[("namespace", &**ns)])?)?;
            }
            if other > 0 {
                ConstGauge::new(as_i64(other)).encode(m.encode_family(&[("namespace", OTHER)])?)?;
            }
            let none = open.saturating_sub(in_namespaces);
            if none > 0 {
                ConstGauge::new(as_i64(none))
                    .encode(m.encode_family(&[("namespace", NO_NAMESPACE)])?)?;
            }
        }
        counter(
            &mut e,
            "switchboard_sockets_opened",
            "Sockets opened since start.",
            t.sockets_opened,
        )?;
        {
            let mut m = e.encode_descriptor(
                "switchboard_sockets_closed",
                "Sockets closed since start, by reason.",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in [
                ("client", t.closed_by_client),
                ("dropped", t.dropped),
                ("heartbeat_timeout", t.heartbeat_timeouts),
                ("protocol_error", t.protocol_errors),
                ("server", t.closed_by_server),
                ("shutdown", t.closed_by_shutdown),
                ("slow_consumer", t.slow_consumers),
                ("io_error", t.io_errors),
                ("over_budget", t.over_budget),
            ] {
                ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        counter(
            &mut e,
            "switchboard_slow_consumer_closes",
            "Sockets closed because their send queue was full or their writes stalled.",
            t.slow_consumers,
        )?;
        {
            let mut m = e.encode_descriptor(
                "switchboard_handshakes_refused",
                "Upgrade requests refused, by reason and HTTP status.",
                None,
                MetricType::Counter,
            )?;
            for (reason, status, n) in [
                ("unauthorized", "401", g.refused_unauthorized),
                ("no_keys", "503", g.refused_no_keys),
                ("namespace", "403", g.refused_namespace),
                ("namespace_repeated", "400", g.refused_namespace_repeated),
                ("namespace_not_utf8", "400", g.refused_namespace_not_utf8),
                ("namespace_too_long", "400", g.refused_namespace_too_long),
                ("origin", "403", t.refused_origin),
                ("user_limit", "429", g.refused_user_limit),
                ("capacity", "503", t.refused_capacity),
                ("head_size", "431", t.refused_head_size),
            ] {
                let labels = [("reason", reason), ("status", status)];
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "switchboard_connections_refused",
                "Connections closed before their request: too many handshakes were in progress, in total (total) or from that client address (per_address), or their TLS handshake failed or timed out (tls).",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in [
                ("total", t.refused_handshakes),
                ("per_address", t.refused_handshakes_per_address),
                ("tls", t.refused_tls),
            ] {
                ConstCounter::new(n).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        for (name, help, n) in [
            (
                "switchboard_handshakes_in_progress",
                "Connections accepted that have not completed their upgrade yet.",
                t.handshakes_in_progress,
            ),
            (
                "switchboard_buffered_bytes",
                "Bytes buffered now across all sockets: incomplete inbound messages and queued outbound frames.",
                t.buffered_bytes,
            ),
            (
                "switchboard_buffered_bytes_peak",
                "The most bytes ever buffered at once across all sockets (never above the budget).",
                t.buffered_bytes_peak,
            ),
            (
                "switchboard_buffer_budget_bytes",
                "The buffer budget (limits.buffer_budget).",
                t.buffer_budget,
            ),
        ] {
            gauge(&mut e, name, help, i64::try_from(n).unwrap_or(i64::MAX))?;
        }
        for (name, help, n) in [
            (
                "switchboard_messages_received",
                "Well-formed messages received from sockets.",
                g.messages_in,
            ),
            (
                "switchboard_bad_messages",
                "Messages refused with an error frame (not JSON, no string type, binary).",
                g.bad_messages,
            ),
            (
                "switchboard_rate_limited_messages",
                "Messages dropped by the per-socket rate limit.",
                g.rate_limited,
            ),
            (
                "switchboard_rate_limit_closes",
                "Sockets closed for staying over the rate limit.",
                g.rate_limit_closes,
            ),
            (
                "switchboard_bus_publish_failures",
                "Publishes of socket events the bus refused.",
                g.publish_failures,
            ),
            (
                "switchboard_handler_failures",
                "Handlers that returned an error or panicked.",
                g.handler_failures,
            ),
            (
                "switchboard_connect_failures",
                "Sockets closed by their connect handler (fail, error or panic).",
                g.connect_failures,
            ),
            (
                "switchboard_connect_gate_timeouts",
                "Sockets closed because, with the connect gate on, no connect handler answered in time.",
                g.gate_timeouts,
            ),
            (
                "switchboard_over_budget_closes",
                "Sockets closed to keep the buffered bytes within the buffer budget (1013).",
                t.over_budget,
            ),
            (
                "switchboard_token_expiry_closes",
                "Sockets closed because their token expired (4001; also counted as reason=server in switchboard_sockets_closed_total).",
                g.token_expiry_closes,
            ),
            (
                "switchboard_token_refreshes",
                "In-band token refreshes accepted.",
                g.refreshes,
            ),
            (
                "switchboard_token_refreshes_refused",
                "In-band token refreshes refused (invalid or missing token); the socket stays open.",
                g.refreshes_refused,
            ),
            (
                "switchboard_token_refresh_mismatches",
                "Sockets closed because a refresh brought a token for another user or namespace.",
                g.refresh_mismatches,
            ),
        ] {
            counter(&mut e, name, help, n)?;
        }
        if let Some(jwks) = &self.readiness.jwks {
            let j = &jwks.stats;
            for (name, help, n) in [
                (
                    "switchboard_jwks_refreshes",
                    "Successful fetches of the identity provider's key set (auth.jwks_url).",
                    j.refreshes.load(Relaxed),
                ),
                (
                    "switchboard_jwks_refresh_failures",
                    "Failed fetches of the key set (unreachable, timeout, not 200, too large, no usable key); the cached keys stay in use (within auth.jwks.max_stale).",
                    j.failures.load(Relaxed),
                ),
                (
                    "switchboard_jwks_refetches",
                    "Fetches started because a token named a kid the key set lacks.",
                    j.refetches.load(Relaxed),
                ),
                (
                    "switchboard_jwks_refetches_limited",
                    "Tokens naming an unknown kid that started no fetch (auth.jwks.refetch_interval).",
                    j.refetches_limited.load(Relaxed),
                ),
            ] {
                counter(&mut e, name, help, n)?;
            }
            gauge(
                &mut e,
                "switchboard_jwks_keys",
                "Usable keys in the cached key set (0 while it is older than auth.jwks.max_stale).",
                as_i64(jwks.current().len()),
            )?;
            gauge(
                &mut e,
                "switchboard_jwks_stale",
                "1 while the cached key set is older than auth.jwks.max_stale (upgrades get 503), else 0.",
                i64::from(jwks.is_stale()),
            )?;
            gauge(
                &mut e,
                "switchboard_jwks_last_success_timestamp_seconds",
                "Unix time of the last successful key set fetch; 0 before the first.",
                i64::try_from(j.last_success.load(Relaxed)).unwrap_or(i64::MAX),
            )?;
        }
        let bus = &self.readiness.bus;
        if bus.node_name().is_some() {
            // A broker bus: what it holds and drops between the broker and the gateway.
            let c = bus.counters();
            counter(
                &mut e,
                "switchboard_bus_incoming_dropped",
                "Messages from the broker dropped because this node held as many as it may: send/broadcast/disconnect (gateway.bus.nats.every_node_bytes), and messages for its handlers while they had not finished (gateway.bus.nats.handler_bytes).",
                c.incoming_dropped,
            )?;
            gauge(
                &mut e,
                "switchboard_bus_incoming_held_bytes",
                "Bytes of messages received from the broker and not yet delivered (send/broadcast/disconnect) or not yet handled to the end (this node's handlers).",
                i64::try_from(c.incoming_held_bytes).unwrap_or(i64::MAX),
            )?;
            gauge(
                &mut e,
                "switchboard_bus_answers_pending",
                "Events published by this node that wait for a handler's answer (at most gateway.bus.nats.max_pending_answers).",
                i64::try_from(c.answers_pending).unwrap_or(i64::MAX),
            )?;
        }
        gauge(
            &mut e,
            "switchboard_ready",
            "1 while the gateway is ready (listening, bus ready, signing keys known, not shutting down), else 0.",
            i64::from(self.readiness.why_not().is_none()),
        )
    }
}

/// Renders `registry` in the Prometheus text format (0.0.4), or in OpenMetrics.
pub(crate) fn render(registry: &PromRegistry, openmetrics: bool) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let result = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
    };
    // Writing to a String cannot fail.
    debug_assert!(result.is_ok());
    out
}

/// `Content-Type` of [`render`]'s output.
pub(crate) fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_namespaces_keeps_the_largest_and_sums_the_rest() {
        let counts = |v: &[(&str, usize)]| -> Vec<(Arc<str>, usize)> {
            v.iter().map(|(n, c)| (Arc::from(*n), *c)).collect()
        };
        let all = counts(&[("a", 1), ("b", 5), ("c", 3), ("d", 3), ("e", 2)]);
        let (top, rest) = top_namespaces(all.clone(), 3);
        assert_eq!(top, counts(&[("b", 5), ("c", 3), ("d", 3)]));
        assert_eq!(rest, 3);
        let (top, rest) = top_namespaces(all.clone(), 10);
        assert_eq!(top.len(), 5);
        assert_eq!(rest, 0);
        let (top, rest) = top_namespaces(all, 0);
        assert!(top.is_empty());
        assert_eq!(rest, 14);
        // Namespaces named like the gauge's own labels: counted in the rest, never a series.
        let labels = counts(&[("(none)", 2), ("a", 4), ("(other)", 1)]);
        let (top, rest) = top_namespaces(labels, 10);
        assert_eq!(top, counts(&[("a", 4)]));
        assert_eq!(rest, 3);
    }

    #[test]
    fn unknown_topics_share_the_other_series() {
        let m = Metrics::new(["a"]);
        m.topic("a").messages_in().inc();
        m.topic("zzz").messages_out().inc();
        m.topic("yyy").messages_out().inc();
        m.topic("a").reply_latency().observe(0.003);
        assert_eq!(m.topic("a").messages_in().get(), 1);
        assert_eq!(m.topic("anything").messages_out().get(), 2);
        let fam = &m.families.messages_out;
        assert!(fam.get(&[("topic", OTHER.to_string())]).is_some());
        assert!(fam.get(&[("topic", "zzz".to_string())]).is_none());
    }
}

//! Prometheus series per endpoint. The `endpoint` label is a name from the config and `kind`
//! one of a fixed list, so nothing a client sends becomes a label value.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type EndpointLabel = [(&'static str, String); 1];
type ErrorLabel = [(&'static str, String); 2];

/// Request latency buckets, in seconds: 1 ms to 30 s.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Why an event or a request failed (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// No complete answer in time (queueing included).
    Timeout,
    /// Connecting, sending or receiving failed.
    Network,
    /// The endpoint answered with a status other than 2xx.
    Status,
    /// The answer was not `{"reply": P}`, `{"fail": E}` or `{}`, or over `max_response`.
    Malformed,
    /// The event was refused: queue (events or bytes) or per-socket bound full.
    QueueFull,
    /// An `onclose` event was given up after its retries (or its retry found the queue full).
    GaveUp,
}

impl ErrorKind {
    const ALL: [ErrorKind; 6] = [
        ErrorKind::Timeout,
        ErrorKind::Network,
        ErrorKind::Status,
        ErrorKind::Malformed,
        ErrorKind::QueueFull,
        ErrorKind::GaveUp,
    ];

    fn label(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Network => "network",
            ErrorKind::Status => "status",
            ErrorKind::Malformed => "malformed",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::GaveUp => "gave_up",
        }
    }
}

/// The families, shared by every endpoint.
pub(crate) struct Families {
    latency: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    requests: Family<EndpointLabel, Counter>,
    retries: Family<EndpointLabel, Counter>,
    errors: Family<ErrorLabel, Counter>,
    held: Family<EndpointLabel, Gauge>,
    in_flight: Family<EndpointLabel, Gauge>,
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Families {
    pub(crate) fn new() -> Self {
        Families {
            latency: Family::new_with_constructor(histogram),
            requests: Family::default(),
            retries: Family::default(),
            errors: Family::default(),
            held: Family::default(),
            in_flight: Family::default(),
        }
    }

    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "switchboard_http_handler_request_duration_seconds",
            "Time from sending a request to an HTTP handler to its whole answer (or its failure), per endpoint",
            self.latency.clone(),
        );
        r.register(
            "switchboard_http_handler_requests",
            "Requests sent to an HTTP handler endpoint (retries included)",
            self.requests.clone(),
        );
        r.register(
            "switchboard_http_handler_retries",
            "onclose requests sent again after a failure",
            self.retries.clone(),
        );
        r.register(
            "switchboard_http_handler_errors",
            "Events or requests of an HTTP handler endpoint that failed, by kind (timeout, network, status, malformed, queue_full, gave_up)",
            self.errors.clone(),
        );
        r.register(
            "switchboard_http_handler_held_events",
            "Events an HTTP handler endpoint holds now (waiting, in flight, waiting to retry)",
            self.held.clone(),
        );
        r.register(
            "switchboard_http_handler_in_flight",
            "Requests in flight to an HTTP handler endpoint now",
            self.in_flight.clone(),
        );
    }

    /// The series of one endpoint, made once.
    pub(crate) fn endpoint(&self, name: &str) -> EndpointMetrics {
        let label = [("endpoint", name.to_string())];
        let errors = ErrorKind::ALL.map(|k| {
            self.errors
                .get_or_create_owned(&[("endpoint", name.to_string()), ("kind", k.label().into())])
        });
        EndpointMetrics {
            latency: self.latency.get_or_create_owned(&label),
            requests: self.requests.get_or_create_owned(&label),
            retries: self.retries.get_or_create_owned(&label),
            held: self.held.get_or_create_owned(&label),
            in_flight: self.in_flight.get_or_create_owned(&label),
            errors,
        }
    }
}

/// One endpoint's handles: the hot path is an atomic add.
pub(crate) struct EndpointMetrics {
    pub(crate) latency: Histogram,
    pub(crate) requests: Counter,
    pub(crate) retries: Counter,
    pub(crate) held: Gauge,
    in_flight: Gauge,
    errors: [Counter; 6],
}

impl EndpointMetrics {
    /// Counts one request in flight until the guard is dropped, however the request ends.
    pub(crate) fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    pub(crate) fn error(&self, kind: ErrorKind) {
        let i = ErrorKind::ALL.iter().position(|k| *k == kind).unwrap_or(0);
        self.errors[i].inc();
    }
}

/// One request counted in `in_flight`; counted out on drop.
pub(crate) struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

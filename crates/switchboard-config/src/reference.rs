//! Every key of the config file, documented once: the source of the reference tables in
//! `docs/CONFIG.md` (`cargo xtask codegen`). The tests below check it against the schema:
//! every listed key exists and accepts its example, and every field the schema has is listed.

/// Whether a key comes from the spec or is our extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Origin {
    /// Defined by the spec's `conf/socket.yaml`.
    Spec,
    /// Our extension; always optional or inside an optional section.
    Ext,
}

/// One key of the config file.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct KeyDoc {
    /// Full key path, e.g. `gateway.socket.heartbeat`; `[]` marks the entries of a list
    /// (`gateway.socket.onmessage.types[].publish`).
    pub path: &'static str,
    /// Value type, in Markdown (`duration`, `` `ip:port` ``, `map`).
    pub kind: &'static str,
    /// Default, in Markdown (`` `30s` ``, `absent`, `**required**`).
    pub default: &'static str,
    /// Spec or extension.
    pub origin: Origin,
    /// What the key does, in Markdown (one paragraph).
    pub doc: &'static str,
    /// A YAML value this key accepts, for the schema tests; `None` for sections.
    pub example: Option<&'static str>,
}

/// A group of keys shown as one table.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Section {
    /// Heading text, in Markdown.
    pub title: &'static str,
    /// Stripped from each key's path in the table.
    pub prefix: &'static str,
    /// The keys, in the order they are shown.
    pub keys: &'static [KeyDoc],
}

impl Section {
    /// True when every key is an extension (the table then leaves out the "Ext." marks).
    pub fn all_ext(&self) -> bool {
        self.keys.iter().all(|k| k.origin == Origin::Ext)
    }
}

/// Every key of the config file, grouped as `docs/CONFIG.md` shows them.
pub fn reference() -> &'static [Section] {
    SECTIONS
}

const fn key(
    path: &'static str,
    kind: &'static str,
    default: &'static str,
    origin: Origin,
    doc: &'static str,
    example: Option<&'static str>,
) -> KeyDoc {
    KeyDoc {
        path,
        kind,
        default,
        origin,
        doc,
        example,
    }
}

use Origin::{Ext, Spec};

const SECTIONS: &[Section] = &[
    Section {
        title: "`gateway`",
        prefix: "gateway.",
        keys: &[
            key(
                "gateway.socket",
                "map",
                "**required**",
                Spec,
                "The socket section below.",
                None,
            ),
            key(
                "gateway.listen",
                "`ip:port`",
                "`127.0.0.1:4000`",
                Ext,
                "Address the listener binds (`0.0.0.0:4000`, `[::]:4000`). `serve --listen` \
                 overrides it.",
                Some("127.0.0.1:4001"),
            ),
            key(
                "gateway.auth",
                "map",
                "all defaults",
                Ext,
                "How a socket's JWT is found and verified.",
                None,
            ),
            key(
                "gateway.limits",
                "map",
                "all defaults",
                Ext,
                "Admission limits and abuse controls, below.",
                None,
            ),
            key(
                "gateway.tls",
                "map",
                "absent",
                Ext,
                "TLS with rustls: the public listener serves `wss://` (and `https://` for the SSE \
                 fallback and routes), and the admin and API listeners serve HTTPS unless their \
                 `tls` is `false`. Absent: plain TCP. See [TLS](../README.md#tls-wss).",
                None,
            ),
            key(
                "gateway.drain",
                "duration",
                "`10s`",
                Ext,
                "On SIGTERM / Ctrl-C, how long to wait for sockets to finish their close (1001) \
                 before exiting. `serve --drain` overrides it.",
                Some("5s"),
            ),
            key(
                "gateway.admin",
                "map",
                "absent",
                Ext,
                "The admin listener: Prometheus metrics and health checks on their own address, \
                 off the public port. Absent: no admin listener. See \
                 [Operating](../README.md#operating).",
                None,
            ),
            key(
                "gateway.api",
                "map",
                "absent",
                Ext,
                "The server API: `POST /api/send`, `/api/broadcast`, `/api/disconnect`, `GET \
                 /api/presence`, `/api/connections` on their own address, for backends that do \
                 not join the bus; authenticated with an API key. Absent: no API listener. See \
                 [the API](API.md).",
                None,
            ),
            key(
                "gateway.log",
                "map",
                "all defaults",
                Ext,
                "How the gateway logs.",
                None,
            ),
            key(
                "gateway.bus",
                "map",
                "absent",
                Ext,
                "A message broker instead of the in-process bus, for several gateway nodes and \
                 handlers in other processes. Absent: the in-process bus.",
                None,
            ),
            key(
                "gateway.http_handlers",
                "list",
                "absent",
                Ext,
                "Topics bound to HTTP endpoints: the node that holds the socket `POST`s their \
                 events there (signed) instead of publishing them on the bus, and the answer \
                 body is the handler's answer. See [PROTOCOL.md](PROTOCOL.md#handlers-over-http).",
                None,
            ),
        ],
    },
    Section {
        title: "`gateway.socket`",
        prefix: "gateway.socket.",
        keys: &[
            key(
                "gateway.socket.path",
                "string",
                "`/connect`",
                Spec,
                "HTTP path that accepts upgrades. Must start with `/`, with no `?`, `#` or \
                 spaces. A plain `GET` here gets `426`, and other paths get `404`.",
                Some("/ws"),
            ),
            key(
                "gateway.socket.onconnect",
                "map",
                "absent",
                Spec,
                "See hooks.",
                None,
            ),
            key(
                "gateway.socket.onmessage",
                "map",
                "absent",
                Spec,
                "See hooks.",
                None,
            ),
            key(
                "gateway.socket.onclose",
                "map",
                "absent",
                Spec,
                "See hooks.",
                None,
            ),
            key(
                "gateway.socket.send",
                "map",
                "absent",
                Spec,
                "See hooks.",
                None,
            ),
            key(
                "gateway.socket.broadcast",
                "map",
                "absent",
                Spec,
                "See hooks.",
                None,
            ),
            key(
                "gateway.socket.disconnect",
                "map",
                "absent",
                Ext,
                "See hooks.",
                None,
            ),
            key(
                "gateway.socket.heartbeat",
                "duration",
                "`30s`",
                Ext,
                "Interval between server pings. A client that has not answered a ping by the \
                 next one is dropped without a close frame. At least `10ms`.",
                Some("15s"),
            ),
            key(
                "gateway.socket.max_message_size",
                "size",
                "`64KiB`",
                Ext,
                "Largest inbound message after fragments are reassembled. A larger one closes \
                 the socket with 1009.",
                Some("1MiB"),
            ),
            key(
                "gateway.socket.send_queue",
                "integer ≥ 1",
                "`256`",
                Ext,
                "Frames that may wait in one socket's outbound queue. When it is full, the \
                 socket is closed (1008, `send queue full`). A socket whose writes make no \
                 progress for one `heartbeat` interval is dropped too.",
                Some("64"),
            ),
            key(
                "gateway.socket.allowed_origins",
                "list of strings",
                "absent",
                Ext,
                "Origins whose pages may open sockets: `scheme://host[:port]` entries, or `\"*\"` \
                 for any. Others get `403`. **Absent: same host only** (the `Origin` host must \
                 equal the `Host` header), which stops cross-site WebSocket hijacking with the \
                 auth cookie; with `gateway.tls` the page must be `https` too (behind a proxy \
                 that ends TLS the scheme is not known, so list the origins to pin it). \
                 Requests without `Origin` (non-browser clients) pass either way. A page's \
                 `Origin` compares as an origin: scheme and host in any case, a default port \
                 written or not (`https://app.example.com:443` is `https://app.example.com`).",
                Some("[\"https://app.example.com\"]"),
            ),
            key(
                "gateway.socket.send_queue_bytes",
                "size",
                "`1MiB`",
                Ext,
                "Bytes that may wait in one socket's outbound queue. When the next frame would \
                 pass it, the socket is closed as a slow consumer (1008, `send queue full`). A \
                 frame is always taken into an empty queue, whatever its size.",
                Some("256KiB"),
            ),
            key(
                "gateway.socket.sse",
                "section",
                "absent",
                Ext,
                "The Server-Sent Events fallback, for clients whose proxies break WebSockets. \
                 Present (`sse: {}` for the defaults), the same gateway is also reachable as an \
                 event stream (`GET`) plus one `POST` per client message, on the same port, with \
                 the same admission, origin policy, limits, heartbeat, rate limit and hooks; \
                 `send` and `broadcast` reach SSE and WebSocket sockets alike. The JS client \
                 falls back to it by itself. The wire is in docs/TRANSPORTS.md.",
                Some("{}"),
            ),
            key(
                "gateway.socket.sse.path",
                "path",
                "socket path + `/sse`",
                Ext,
                "Path of the event stream and of the posts (`POST {path}?session={id}`). Must \
                 differ from `socket.path`.",
                Some("/events"),
            ),
            key(
                "gateway.socket.context_headers",
                "list of strings",
                "`[user-agent, origin, x-forwarded-for, x-request-id]`",
                Ext,
                "Upgrade request headers copied into the context handlers see \
                 (`context.headers`), by name. At most 4 KiB of them are kept per socket (in \
                 this order; the rest are left out). `cookie`, `authorization` and \
                 `proxy-authorization` are refused here: credentials never reach messages. The \
                 verified claims are always at `context.headers.jwt`. `[]` copies none.",
                Some("[\"user-agent\", \"x-tenant\"]"),
            ),
        ],
    },
    Section {
        title: "`gateway.limits`",
        prefix: "gateway.limits.",
        keys: &[
            key(
                "gateway.limits.max_sockets",
                "integer ≥ 1",
                "the open-file limit's room",
                Ext,
                "Sockets open at once (upgrades in progress included). More get `503` with \
                 `Retry-After` before the upgrade. With `socket.sse`, SSE sessions are counted \
                 apart against the same number (so both together may reach twice it): leave \
                 room for both under the process's open-file limit, which applies regardless. \
                 Left out: what the process's soft open-file limit has room for, less a \
                 reserve of 128 or a fiftieth of it (whichever is more) and less \
                 `max_handshakes` (lowered to half the room if it is more): 18,576 under a \
                 limit of 20,000; halved for each transport when SSE is on. So a flood of \
                 sockets or of slow upgrades gets `503` or is closed, rather than `accept` \
                 failing and every later connection, health checks included, hanging \
                 unanswered. No limit where the open-file limit cannot be read (not Linux) or \
                 is unlimited.",
                Some("19000"),
            ),
            key(
                "gateway.limits.max_sockets_per_user",
                "integer ≥ 1",
                "no limit",
                Ext,
                "Sockets one username may hold. More get `429` with `Retry-After`. Checked at \
                 admission, with the user's upgrades still in flight counted; a socket waiting \
                 at the connect gate is counted again at its verdict.",
                Some("20"),
            ),
            key(
                "gateway.limits.handshake_timeout",
                "duration",
                "`10s`",
                Ext,
                "How long a connection may take from being accepted to completing its upgrade \
                 (or receiving its one HTTP response) before it is closed. At least `100ms`.",
                Some("5s"),
            ),
            key(
                "gateway.limits.max_handshakes",
                "integer ≥ 1",
                "`1024`",
                Ext,
                "Connections that have not completed their upgrade, at most. More are closed as \
                 soon as they are accepted, before a byte is read, so a flood of half-open \
                 upgrades cannot take the file descriptors the sockets need.",
                Some("4096"),
            ),
            key(
                "gateway.limits.max_handshakes_per_address",
                "integer ≥ 1",
                "`64`",
                Ext,
                "The same, per client: an IPv4 address, or an IPv6 /64. Behind a proxy that \
                 hides client addresses (every connection comes from the proxy), raise it to \
                 about `max_handshakes`.",
                Some("64"),
            ),
            key(
                "gateway.limits.max_request_head",
                "size",
                "`32KiB`",
                Ext,
                "Largest upgrade request head (request line and headers). Larger gets `431`. At \
                 least `1KiB`.",
                Some("16KiB"),
            ),
            key(
                "gateway.limits.buffer_budget",
                "size",
                "`256MiB`",
                Ext,
                "Bytes buffered across all sockets, at most: incomplete inbound messages and \
                 queued outbound frames (a frame shared by many sockets counts once per \
                 socket). At the budget, the sockets that hold the most, above a fair share \
                 (the budget divided by the open sockets), are closed with 1013 (`buffer \
                 budget exceeded`); a socket within its fair share is never refused. At least \
                 `socket.max_message_size`.",
                Some("1GiB"),
            ),
            key(
                "gateway.limits.messages_per_second",
                "integer ≥ 1",
                "off",
                Ext,
                "Sustained inbound messages per socket. Over it, a message is dropped; the first \
                 of a run gets an error frame (`rate limit exceeded ...`).",
                Some("50"),
            ),
            key(
                "gateway.limits.message_burst",
                "integer ≥ 1",
                "2 × rate",
                Ext,
                "Messages a socket may send at once above the rate. A socket refused this many \
                 times in a row is closed (1008, `rate limit exceeded`). Only with \
                 `messages_per_second` (alone it is an error).",
                Some("100"),
            ),
        ],
    },
    Section {
        title: "Hooks",
        prefix: "gateway.socket.",
        keys: &[
            key(
                "gateway.socket.onconnect.publish",
                "topic",
                "required in `onconnect`",
                Spec,
                "Topic published when a socket is accepted.",
                Some("\"socket:connection\""),
            ),
            key(
                "gateway.socket.onconnect.gate",
                "bool",
                "`false`",
                Ext,
                "Hold each new socket until a connect handler answers (AWS API Gateway's \
                 `$connect`): until its `reply`, nothing the socket sends is read or published \
                 and no `send`/`broadcast` reaches it; its `fail` (or an error) closes the \
                 socket and what the client sent meanwhile is dropped unread. With the gate on, \
                 a connect handler must `reply` (or `fail`).",
                Some("true"),
            ),
            key(
                "gateway.socket.onconnect.gate_timeout",
                "duration",
                "`10s`",
                Ext,
                "With `gate`: how long a socket waits for the verdict before it is closed \
                 (1011, `connect handler did not answer`).",
                Some("5s"),
            ),
            key(
                "gateway.socket.onmessage.publish",
                "topic",
                "absent",
                Spec,
                "Topic that receives every valid message a socket sends.",
                Some("\"socket:generalMessage\""),
            ),
            key(
                "gateway.socket.onmessage.types",
                "list",
                "`[]`",
                Spec,
                "Routes by `type`. Matching messages are published to the entry's topic *as \
                 well as* to `onmessage.publish`.",
                None,
            ),
            key(
                "gateway.socket.onclose.publish",
                "topic",
                "required in `onclose`",
                Spec,
                "Topic published when a socket ends.",
                Some("\"socket:close\""),
            ),
            key(
                "gateway.socket.send.subscribe",
                "topic",
                "required in `send`",
                Spec,
                "Built-in subscriber that delivers to one user's sockets.",
                Some("\"socket:send\""),
            ),
            key(
                "gateway.socket.broadcast.subscribe",
                "topic",
                "required in `broadcast`",
                Spec,
                "Built-in subscriber that delivers to all sockets, or to one namespace's sockets.",
                Some("\"socket:broadcast\""),
            ),
            key(
                "gateway.socket.disconnect.subscribe",
                "topic",
                "required in `disconnect`",
                Ext,
                "Built-in subscriber that closes one user's sockets on every node: data \
                 `{username, namespace?, code?, reason?}` closes that user's sockets (in that \
                 namespace) with `code` (default 4002, or any code a server may send: 1000, \
                 1001, 1008, 1011, 3000-4999) and `reason`; each publishes `onclose` once. For \
                 logout, bans, revoked tokens: it closes sockets, it does not refuse the user's \
                 next connection (the JS client reconnects, so refuse it at admission or in the \
                 connect handler too). A socket still waiting at the connect gate is not reached.",
                Some("\"socket:disconnect\""),
            ),
        ],
    },
    Section {
        title: "`onmessage.types[]`",
        prefix: "gateway.socket.onmessage.types[].",
        keys: &[
            key(
                "gateway.socket.onmessage.types[].type",
                "string",
                "required",
                Spec,
                "Value of the incoming message's `type` field, matched exactly. Must be unique \
                 in the list.",
                Some("\"chat.say\""),
            ),
            key(
                "gateway.socket.onmessage.types[].publish",
                "topic",
                "required",
                Spec,
                "Topic for messages of this type. It may be the `broadcast` topic (every socket \
                 then hears the client's message, as in the spec's example), but no hook may \
                 publish to the `send` or `disconnect` topic: the config is refused, since any \
                 client could then message any user in another's name or close anyone's \
                 sockets (publish to a topic of your own and have a handler check and forward).",
                Some("\"chat:say\""),
            ),
        ],
    },
    Section {
        title: "`gateway.auth`",
        prefix: "gateway.auth.",
        keys: &[
            key(
                "gateway.auth.cookie",
                "string, non-empty",
                "`ID_TOKEN`",
                Ext,
                "Name of the cookie that carries the token.",
                Some("SESSION"),
            ),
            key(
                "gateway.auth.username_claim",
                "string, non-empty",
                "`preferred_username`",
                Ext,
                "Claim whose non-empty string value becomes the socket's username.",
                Some("sub"),
            ),
            key(
                "gateway.auth.algorithm",
                "enum",
                "`HS256`",
                Ext,
                "One of `HS256`, `HS384`, `HS512`, `RS256`, `RS384`, `RS512`, `ES256`, `ES384`, \
                 `EdDSA`. The token's `alg` must match it. Not with `jwks_url` (each key of the \
                 set has its own; see `jwks.algorithms`).",
                Some("HS512"),
            ),
            key(
                "gateway.auth.secret_env",
                "string",
                "`SWITCHBOARD_JWT_SECRET`",
                Ext,
                "HS\\* only. Name of the environment variable that holds the shared secret. \
                 Setting it with RS\\*/ES\\* is an error.",
                Some("MY_JWT_SECRET"),
            ),
            key(
                "gateway.auth.public_key_file",
                "path",
                "absent",
                Ext,
                "RS\\*/ES\\*/EdDSA only, and required for them unless `jwks_url` is set. PEM \
                 public key (RSA for RS\\*, EC for ES\\*, Ed25519 for EdDSA). A relative path is \
                 resolved from the working directory. Setting it with HS\\* is an error. `serve` \
                 refuses to start, naming the file, when it holds a private key or is not a \
                 PEM key for the algorithm.",
                Some("/etc/switchboard/jwt.pem"),
            ),
            key(
                "gateway.auth.jwks_url",
                "`http(s)://` URL",
                "absent",
                Ext,
                "Verify tokens with the identity provider's key set (JWKS) at this URL instead of \
                 `secret_env` / `public_key_file` (setting either, or `algorithm`, with it is an \
                 error). It must be `https://` (plain `http://` only to a loopback host: whoever \
                 serves the set decides who may connect). RSA keys under 2048 or over 4096 bits \
                 are left out of the set. A token must name a `kid` of the set (a token without `kid` is accepted \
                 only while the set has exactly one key); the key's own `alg` (or its type: RSA \
                 → RS256, P-256 → ES256, Ed25519 → EdDSA) must be in `jwks.algorithms`, and the \
                 token's `alg` must equal it. A token's `jku`/`x5u` headers are ignored: nothing \
                 a client sends changes what is fetched. **Start-up**: the gateway serves at once \
                 (after at most `jwks.startup_wait`); until the first successful fetch `/readyz` \
                 answers `503` and upgrades get `503` with `Retry-After: 5`, not `401`. While the \
                 provider is unreachable the cached keys keep working (for `jwks.max_stale` at \
                 most, if set).",
                Some("\"https://id.example.com/.well-known/jwks.json\""),
            ),
            key(
                "gateway.auth.jwks",
                "map",
                "all defaults",
                Ext,
                "How the key set is cached and fetched (with `jwks_url` only). The answer is read \
                 up to 1 MiB and 100 usable keys (RSA moduli up to 4096 bits); more is a failed \
                 fetch or left out.",
                None,
            ),
            key(
                "gateway.auth.jwks.min_refresh",
                "duration",
                "`1m`",
                Ext,
                "The set is kept at least this long, whatever the answer's `Cache-Control: \
                 max-age` says (`no-cache` / `no-store` count as 0). At least `1s`. A failed fetch \
                 is retried after 0.5 s, doubling up to this.",
                Some("5m"),
            ),
            key(
                "gateway.auth.jwks.max_refresh",
                "duration",
                "`1h`",
                Ext,
                "... and at most this long; also the lifetime of an answer without `max-age`. At \
                 least `min_refresh`.",
                Some("6h"),
            ),
            key(
                "gateway.auth.jwks.refetch_interval",
                "duration",
                "`30s`",
                Ext,
                "A token naming a `kid` the set does not have (a key rotated in) fetches the set \
                 again at once, at most once per this interval: its upgrade waits for that fetch \
                 (tokens arriving meanwhile wait for the same one), then is verified. Within the \
                 interval an unknown `kid` is refused (`401`) without a fetch, so forged `kid`s \
                 cannot make the gateway hammer the provider. At least `1s`.",
                Some("1m"),
            ),
            key(
                "gateway.auth.jwks.timeout",
                "duration",
                "`5s`",
                Ext,
                "The whole fetch (connect, TLS, answer, body) must finish within it, else it fails.",
                Some("2s"),
            ),
            key(
                "gateway.auth.jwks.startup_wait",
                "duration",
                "`5s`",
                Ext,
                "How long start-up waits for the first fetch to succeed or fail before serving \
                 anyway. `0s`: not at all.",
                Some("0s"),
            ),
            key(
                "gateway.auth.jwks.ca_file",
                "path",
                "absent",
                Ext,
                "PEM file of CA certificates trusted beside the system's, for a provider with a \
                 private CA (`https://` URLs).",
                Some("/etc/switchboard/idp-ca.pem"),
            ),
            key(
                "gateway.auth.jwks.algorithms",
                "list",
                "`[RS256, ES256, EdDSA]`",
                Ext,
                "The algorithms a key of the set may verify with; keys for others are left out. \
                 Any of `RS256`, `RS384`, `RS512`, `ES256`, `ES384`, `EdDSA`; HS\\* is refused \
                 (a key set gives public keys only, and a symmetric `oct` key in it is ignored).",
                Some("[RS256]"),
            ),
            key(
                "gateway.auth.jwks.max_stale",
                "duration",
                "absent",
                Ext,
                "If set, the cached set is trusted only this long after the last successful \
                 fetch: past it, upgrades (and in-band `$refresh`es) are refused with `503` and \
                 `/readyz` is not ready until a fetch succeeds, retried every 5 s at most \
                 meanwhile (fail closed: a key the provider has revoked stops admitting even while \
                 the provider cannot be reached; sockets open already stay until their token's \
                 `exp`). Absent: the last set fetched is kept as long as the provider cannot be \
                 reached (fail open). At least twice `max_refresh` plus `timeout`.",
                Some("24h"),
            ),
            key(
                "gateway.auth.leeway",
                "duration",
                "`0s`",
                Ext,
                "Clock skew tolerated on `exp` and `nbf`. Whole seconds only: `1500ms` counts \
                 as 1 s.",
                Some("30s"),
            ),
            key(
                "gateway.auth.issuer",
                "string",
                "absent",
                Ext,
                "If set, tokens must carry `iss`, equal to it.",
                Some("\"https://id.example.com\""),
            ),
            key(
                "gateway.auth.audience",
                "string",
                "absent",
                Ext,
                "If set, tokens must carry `aud`, equal to or containing it. If unset, `aud` is \
                 not checked.",
                Some("switchboard"),
            ),
            key(
                "gateway.auth.namespace_claim",
                "string",
                "absent",
                Ext,
                "If set, a socket may only ask for a `?namespace=` listed in this claim (a \
                 string, or an array of strings); others get `403`. Absent: any namespace, as in \
                 the spec (the connect handler decides).",
                Some("tenants"),
            ),
            key(
                "gateway.auth.close_on_expiry",
                "bool",
                "`true`",
                Ext,
                "Close a socket when its token's `exp` plus `leeway` passes (4001, `token \
                 expired`; `onclose` is published), unless the client has sent a fresh token \
                 for the same user first (`{\"type\":\"$refresh\",\"payload\":{\"token\":...}}`). \
                 `false`: sockets outlive their token, as in the spec.",
                Some("false"),
            ),
        ],
    },
    Section {
        title: "`gateway.admin`",
        prefix: "gateway.admin.",
        keys: &[
            key(
                "gateway.admin.listen",
                "`ip:port`",
                "required in `admin`",
                Ext,
                "Address of the admin listener: `GET /metrics` (Prometheus), `/healthz` (the \
                 process is alive), `/readyz` (listening and the bus is ready; `503` while \
                 shutting down). Keep it off the public network. `serve --admin-listen` \
                 overrides it (and works without this section).",
                Some("127.0.0.1:9090"),
            ),
            key(
                "gateway.admin.top_namespaces",
                "integer",
                "`20`",
                Ext,
                "How many namespaces get their own `switchboard_sockets_open_by_namespace` \
                 series: the ones with the most sockets at scrape time. The rest are summed under \
                 `namespace=\"(other)\"`, which caps the label's cardinality. `0`: all under \
                 `(other)`. Sockets without a namespace are `(none)`; a namespace a client names \
                 `(other)` or `(none)` counts under `(other)`, so no label appears twice.",
                Some("50"),
            ),
            key(
                "gateway.admin.tls",
                "bool",
                "`true`",
                Ext,
                "With `gateway.tls` present, serve the admin listener over HTTPS with that \
                 certificate; `false` keeps it plain HTTP (a Prometheus on the same host, say). \
                 Without `gateway.tls` it is plain HTTP either way.",
                Some("false"),
            ),
        ],
    },
    Section {
        title: "`gateway.api`",
        prefix: "gateway.api.",
        keys: &[
            key(
                "gateway.api.listen",
                "`ip:port`",
                "required in `api`",
                Ext,
                "Address of the API listener. It is never the public socket port unless you \
                 make it so; keep it off the public network.",
                Some("127.0.0.1:4002"),
            ),
            key(
                "gateway.api.key_env",
                "string",
                "`SWITCHBOARD_API_KEY`",
                Ext,
                "The environment variable that holds the API key (at least 16 bytes; the gateway \
                 refuses to start without it). Callers send `Authorization: Bearer <key>`; it is \
                 compared in constant time, and a request without it gets `401`.",
                Some("MY_API_KEY"),
            ),
            key(
                "gateway.api.max_body",
                "size",
                "`64KiB`",
                Ext,
                "Largest request body; larger gets `413`.",
                Some("16KiB"),
            ),
            key(
                "gateway.api.tls",
                "bool",
                "`true`",
                Ext,
                "With `gateway.tls` present, serve the API over HTTPS with that certificate (the \
                 API key crosses this connection); `false` keeps it plain HTTP. Without \
                 `gateway.tls` it is plain HTTP either way.",
                Some("false"),
            ),
        ],
    },
    Section {
        title: "`gateway.tls`",
        prefix: "gateway.tls.",
        keys: &[
            key(
                "gateway.tls.cert_file",
                "path",
                "required in `tls`",
                Ext,
                "The certificate chain in PEM, leaf first. Read at start (an unreadable or \
                 invalid file stops the start with an error naming it) and again on reload.",
                Some("/etc/switchboard/tls.crt"),
            ),
            key(
                "gateway.tls.key_file",
                "path",
                "required in `tls`",
                Ext,
                "Its private key in PEM (PKCS#8, PKCS#1 or SEC1); it must match the certificate.",
                Some("/etc/switchboard/tls.key"),
            ),
            key(
                "gateway.tls.min_version",
                "`\"1.2\"` or `\"1.3\"`",
                "`\"1.2\"`",
                Ext,
                "The oldest TLS version accepted; older clients fail the handshake (counted in \
                 `switchboard_connections_refused{reason=\"tls\"}`). Cipher suites are \
                 rustls's defaults: AEAD only, forward secrecy only.",
                Some("\"1.3\""),
            ),
            key(
                "gateway.tls.reload_interval",
                "duration",
                "`10s`",
                Ext,
                "How often the two files are looked at (modification time and size); a change \
                 reloads them. New connections get the new certificate, open sockets keep \
                 theirs. A file that does not load is logged and the old certificate stays. \
                 `0s` turns the look off; `SIGHUP` reloads at any time.",
                Some("1m"),
            ),
        ],
    },
    Section {
        title: "`gateway.log`",
        prefix: "gateway.log.",
        keys: &[key(
            "gateway.log.format",
            "`text` or `json`",
            "`text`",
            Ext,
            "Log lines on stderr: human-readable text, or one JSON object per line for log \
             shippers; text is coloured only when stderr is a terminal. Which events are \
             logged is set by the `RUST_LOG` environment variable (default `info`; e.g. \
             `RUST_LOG=switchboard=debug`); one that does not parse is named in a warning and \
             `info` is used.",
            Some("json"),
        )],
    },
    Section {
        title: "`gateway.bus`",
        prefix: "gateway.bus.",
        keys: &[
            key(
                "gateway.bus.nats",
                "map",
                "required in `bus`",
                Ext,
                "NATS: topics are NATS subjects; several gateway nodes and handlers in any \
                 language share one broker.",
                None,
            ),
            key(
                "gateway.bus.nats.url",
                "string or list",
                "required in `nats`",
                Ext,
                "Server URL (`nats://host:4222`, `tls://host:4222`), or a list of the members of \
                 a cluster: the node connects to one and, when it goes away, to another (also to \
                 members the cluster announces), keeping its sockets open. Credentials in a \
                 URL (`nats://user:password@host:4222`, `nats://token@host:4222`, \
                 percent-escaped) are used as `auth` would be, and given to the client apart \
                 from the URL, so no log or message shows them, and to every server (those the \
                 cluster announces too); not together with `auth`, and the same in every URL \
                 that carries any. A port from 1 to 65535.",
                Some("nats://127.0.0.1:4222"),
            ),
            key(
                "gateway.bus.nats.reply_timeout",
                "duration",
                "`10s`",
                Ext,
                "How long a socket's message waits for a handler's answer; after it, the socket \
                 gets an error frame.",
                Some("3s"),
            ),
            key(
                "gateway.bus.nats.node_name",
                "string",
                "`switchboard`",
                Ext,
                "A label for humans and permissions: the NATS connection name and a token of the \
                 node's reply subjects (`_SB_REPLY.<node_name>.<token>.<id>`). Each process adds \
                 a random token, so replicas started from one config never get each other's \
                 answers. `.`-separated non-empty tokens without whitespace, `*` or `>`.",
                Some("gw-1"),
            ),
            key(
                "gateway.bus.nats.auth",
                "map",
                "absent",
                Ext,
                "How the node authenticates: exactly one of `user` with `password`, `token`, \
                 `nkey_seed`, `creds_file`. Put secrets in the environment: \
                 `password: \"${NATS_PASSWORD}\"`. Which subjects each NATS user needs: \
                 [PROTOCOL.md](PROTOCOL.md#securing-nats).",
                None,
            ),
            key(
                "gateway.bus.nats.auth.user",
                "string",
                "absent",
                Ext,
                "User name (`authorization.users` of the server), with `password`.",
                Some("gw-1"),
            ),
            key(
                "gateway.bus.nats.auth.password",
                "string",
                "absent",
                Ext,
                "The user's password, with `user`.",
                Some("\"s3cret\""),
            ),
            key(
                "gateway.bus.nats.auth.token",
                "string",
                "absent",
                Ext,
                "A token (`authorization.token` of the server).",
                Some("\"t0ken\""),
            ),
            key(
                "gateway.bus.nats.auth.nkey_seed",
                "string",
                "absent",
                Ext,
                "An NKey user seed (`SU...`); the server lists its public key (`U...`).",
                Some("SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GCZ7IUQQXZIORRBU"),
            ),
            key(
                "gateway.bus.nats.auth.creds_file",
                "path",
                "absent",
                Ext,
                "A `.creds` file (user JWT and seed) for decentralized auth (operator mode).",
                Some("/etc/switchboard/gw-1.creds"),
            ),
            key(
                "gateway.bus.nats.tls",
                "map",
                "absent",
                Ext,
                "TLS to the servers. Present (even empty), TLS is required; `tls://` URLs ask for \
                 it too. The system's CAs are trusted, and `ca_file`'s.",
                None,
            ),
            key(
                "gateway.bus.nats.tls.ca_file",
                "path",
                "absent",
                Ext,
                "PEM file of CA certificates to trust (a private CA).",
                Some("/etc/switchboard/nats-ca.pem"),
            ),
            key(
                "gateway.bus.nats.tls.cert_file",
                "path",
                "absent",
                Ext,
                "PEM client certificate, with `key_file`, for servers that verify clients \
                 (`verify: true`).",
                Some("/etc/switchboard/gw-1.pem"),
            ),
            key(
                "gateway.bus.nats.tls.key_file",
                "path",
                "absent",
                Ext,
                "PEM private key of `cert_file`.",
                Some("/etc/switchboard/gw-1-key.pem"),
            ),
            key(
                "gateway.bus.nats.outbox_bytes",
                "size",
                "`64MiB`",
                Ext,
                "Most bytes of events waiting to be written to NATS (e.g. while it is slow); over \
                 it, a socket's event is refused with an error frame instead of queued. At most \
                 65,536 events wait either way.",
                Some("16MiB"),
            ),
            key(
                "gateway.bus.nats.max_pending_answers",
                "integer",
                "`262144`",
                Ext,
                "Most events waiting for a handler's answer at once (each keeps the way back to \
                 its socket until the answer or `reply_timeout`); over it, answerable events are \
                 refused with an error frame.",
                Some("10000"),
            ),
            key(
                "gateway.bus.nats.every_node_bytes",
                "size",
                "`64MiB`",
                Ext,
                "Most bytes of `send`, `broadcast` and `disconnect` messages that one of them \
                 holds, received from NATS and not yet delivered (a publisher faster than the \
                 node's fan-out); over it, newer messages are dropped, logged at most once a \
                 second. At most 65,536 messages wait either way.",
                Some("16MiB"),
            ),
            key(
                "gateway.bus.nats.handler_bytes",
                "size",
                "`64MiB`",
                Ext,
                "Most bytes of messages on one topic this node's handlers take (in the queue \
                 group) that it holds, received from NATS and whose handler has not finished \
                 (handlers that wait, say on an HTTP call, add up); over it, newer messages \
                 are dropped, logged at most once a second, and an event that waits for an \
                 answer gets `the handlers are busy; try again later` at once. Counted as JSON \
                 text: the parsed values a waiting handler holds take more. At most 65,536 \
                 messages wait either way.",
                Some("16MiB"),
            ),
            key(
                "gateway.bus.nats.gather_quiet",
                "duration",
                "`50ms`",
                Ext,
                "How long a presence question (the API's `/api/presence` and \
                 `/api/connections`, `Presence` in handlers) waits for another node's answer \
                 once one has come; it waits 1 s at most in all. Nodes on one NATS answer \
                 within milliseconds of each other, but a node whose process is held up longer \
                 than this is left out of that answer (the answer says how many nodes \
                 answered). Raise it on busy machines; more than 0, at most `1s`.",
                Some("200ms"),
            ),
        ],
    },
    Section {
        title: "`gateway.http_handlers[]`",
        prefix: "gateway.http_handlers[].",
        keys: &[
            key(
                "gateway.http_handlers[].url",
                "string",
                "**required**",
                Ext,
                "`http://` or `https://` URL the events are `POST`ed to (no credentials in it: \
                 the requests are signed). HTTP/2 is used when a TLS endpoint offers it; \
                 connections are kept alive and reused.",
                Some("\"http://127.0.0.1:8081/events\""),
            ),
            key(
                "gateway.http_handlers[].topics",
                "list of topics",
                "**required**",
                Ext,
                "The topics this endpoint handles, each one a socket hook publishes to \
                 (`onconnect`, `onmessage`, `onmessage.types`, `onclose`); a topic is bound to \
                 one endpoint at most. Their events are no longer published on the bus.",
                Some("[\"socket:connection\"]"),
            ),
            key(
                "gateway.http_handlers[].name",
                "string",
                "the URL's `host:port`",
                Ext,
                "The endpoint's label in metrics (`endpoint=\"...\"`) and logs; unique in the list.",
                Some("chat-backend"),
            ),
            key(
                "gateway.http_handlers[].timeout",
                "duration",
                "`10s`",
                Ext,
                "How long a socket waits for the answer, time in the queue included; then it \
                 gets the same error frame as when a NATS handler is silent \
                 (`no handler answered within ...`). At most `1h`. It also bounds a new \
                 connection (TCP and TLS, at most 5 s), and an HTTP/2 connection silent for it \
                 (clamped to 1-5 s) is sent a PING and dropped if that goes unanswered as long.",
                Some("2s"),
            ),
            key(
                "gateway.http_handlers[].concurrency",
                "integer",
                "`32`",
                Ext,
                "Most requests in flight to this endpoint at once (per node), 1 to 4,096.",
                Some("8"),
            ),
            key(
                "gateway.http_handlers[].queue",
                "integer",
                "`256`",
                Ext,
                "Most events waiting for a free request slot; when it is full an answerable event \
                 gets the error frame `handler queue full` at once. `0`: nothing waits; at most \
                 1,000,000. Events that wait for no answer (`onclose`) count against \
                 `queue_bytes` and 64 times this count of all events held instead, so a mass \
                 disconnect or a shutdown still sends every close, and a backlog of closes \
                 never refuses a socket's messages.",
                Some("64"),
            ),
            key(
                "gateway.http_handlers[].queue_bytes",
                "size",
                "`16MiB`",
                Ext,
                "Most bytes of request bodies the endpoint holds (waiting, in flight, waiting to \
                 retry); over it, as for a full queue.",
                Some("4MiB"),
            ),
            key(
                "gateway.http_handlers[].per_socket",
                "integer",
                "`16`",
                Ext,
                "Most answerable events of one socket this endpoint holds at once, so one busy \
                 socket cannot fill the queue alone; over it, as for a full queue. A socket's \
                 `onclose` is never refused for it. One username's sockets together are bound \
                 by `per_user`.",
                Some("4"),
            ),
            key(
                "gateway.http_handlers[].per_user",
                "integer",
                "half of `concurrency`, at least 1",
                Ext,
                "Most answerable events of one username, all its sockets together, this \
                 endpoint holds at once, so one token holder opening many sockets leaves at \
                 least half the endpoint's requests in flight to everyone else; over it, as for a full queue (a \
                 refused `onconnect` closes its socket with 1008). `onclose` is never refused \
                 for it. Several users flooding a slow endpoint together can \
                 still fill it: size `queue` for the users you expect to be busy at once. Leave \
                 the key out for the default; at most 1,004,096 (a value of `concurrency + \
                 queue` or more turns the bound off).",
                Some("64"),
            ),
            key(
                "gateway.http_handlers[].max_response",
                "size",
                "`64KiB`",
                Ext,
                "Largest answer body; a larger one is a malformed answer (error frame) and the \
                 connection is dropped.",
                Some("16KiB"),
            ),
            key(
                "gateway.http_handlers[].ca_file",
                "path",
                "absent",
                Ext,
                "PEM CA trusted beside the system's roots, for an `https://` endpoint with a \
                 private CA.",
                Some("/etc/switchboard/handlers-ca.pem"),
            ),
            key(
                "gateway.http_handlers[].secret_env",
                "string",
                "`SWITCHBOARD_HANDLER_SECRET`",
                Ext,
                "The environment variable with the secret (at least 16 bytes) each request is \
                 signed with (`X-Switchboard-Signature`, see PROTOCOL.md). Unset: the gateway \
                 does not start.",
                Some("CHAT_HANDLER_SECRET"),
            ),
            key(
                "gateway.http_handlers[].pass_headers",
                "list of header names",
                "none",
                Ext,
                "Headers of the socket's upgrade request sent along with each of its events \
                 (at most 16; kept per socket with `socket.context_headers`, within the same \
                 4 KiB). Never `cookie`, `authorization`, `proxy-authorization`, nor a header \
                 the gateway sets (`host`, `content-type`, `user-agent`, `x-switchboard-*`, ...).",
                Some("[\"x-request-id\", \"accept-language\"]"),
            ),
            key(
                "gateway.http_handlers[].onclose_retries",
                "integer",
                "`2`",
                Ext,
                "How many more times an `onclose` event (which no socket waits for) is sent after \
                 a network error, a timeout, a `429` or a `5xx`; at most 10. Events that are \
                 answered are never sent twice.",
                Some("3"),
            ),
            key(
                "gateway.http_handlers[].retry_backoff",
                "duration",
                "`500ms`",
                Ext,
                "Wait before the first retry; each next one waits twice as long.",
                Some("1s"),
            ),
        ],
    },
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_yaml::{Mapping, Value};

    use super::*;
    use crate::Config;

    fn all_keys() -> impl Iterator<Item = &'static KeyDoc> {
        reference().iter().flat_map(|s| s.keys.iter())
    }

    /// The direct children of `parent` (`"gateway"`, `"gateway.socket.onmessage.types[]"`).
    fn children(parent: &str) -> BTreeSet<&'static str> {
        all_keys()
            .filter_map(|k| k.path.strip_prefix(parent)?.strip_prefix('.'))
            .filter(|rest| !rest.contains('.'))
            .collect()
    }

    /// A YAML document with `value` at `path`; `[]` segments become one-entry lists.
    fn nested(path: &str, value: Value, doc: &mut Value) {
        let mut node = doc;
        let segments: Vec<&str> = path.split('.').collect();
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let (name, list) = match seg.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (*seg, false),
            };
            let map = node.as_mapping_mut().expect("a map");
            let key = Value::String(name.into());
            if last {
                map.insert(key, value);
                return;
            }
            let entry = map.entry(key).or_insert_with(|| {
                if list {
                    Value::Sequence(vec![Value::Mapping(Mapping::new())])
                } else {
                    Value::Mapping(Mapping::new())
                }
            });
            node = if list {
                entry.as_sequence_mut().unwrap().get_mut(0).unwrap()
            } else {
                entry
            };
        }
    }

    /// The smallest valid config: `gateway.socket: {}`.
    fn base() -> Value {
        let mut doc = Value::Mapping(Mapping::new());
        nested("gateway.socket", Value::Mapping(Mapping::new()), &mut doc);
        doc
    }

    fn parse(doc: &Value) -> Result<Config, crate::ConfigError> {
        Config::from_yaml_str_with_env(&serde_yaml::to_string(doc).unwrap(), &|_| None)
    }

    #[test]
    fn every_listed_key_exists_and_accepts_its_example() {
        for k in all_keys() {
            let Some(example) = k.example else {
                assert!(
                    !children(k.path).is_empty() || k.kind == "list",
                    "{}: only sections go without an example",
                    k.path
                );
                continue;
            };
            let mut doc = base();
            // required siblings, and those of each enclosing section (and the list entry's
            // fields), need values too
            for sibling in all_keys() {
                let sibling_parent = sibling.path.rsplit_once('.').unwrap().0;
                if k.path.starts_with(&format!("{sibling_parent}."))
                    && sibling.default.contains("required")
                {
                    if let Some(e) = sibling.example {
                        nested(sibling.path, serde_yaml::from_str(e).unwrap(), &mut doc);
                    }
                }
            }
            if k.path.starts_with("gateway.http_handlers") {
                // a bound topic must be one a hook publishes to
                nested(
                    "gateway.socket.onconnect.publish",
                    "socket:connection".into(),
                    &mut doc,
                );
            }
            if k.path == "gateway.limits.message_burst" {
                nested("gateway.limits.messages_per_second", 50.into(), &mut doc);
            }
            if k.path == "gateway.auth.public_key_file" {
                nested("gateway.auth.algorithm", "RS256".into(), &mut doc);
            }
            if k.path.starts_with("gateway.auth.jwks.") {
                nested(
                    "gateway.auth.jwks_url",
                    "https://id.example.com/".into(),
                    &mut doc,
                );
            }
            // keys that only go in pairs
            for (key, partner, value) in [
                (
                    "gateway.bus.nats.auth.password",
                    "gateway.bus.nats.auth.user",
                    "gw",
                ),
                (
                    "gateway.bus.nats.auth.user",
                    "gateway.bus.nats.auth.password",
                    "pw",
                ),
                (
                    "gateway.bus.nats.tls.cert_file",
                    "gateway.bus.nats.tls.key_file",
                    "/k",
                ),
                (
                    "gateway.bus.nats.tls.key_file",
                    "gateway.bus.nats.tls.cert_file",
                    "/c",
                ),
            ] {
                if k.path == key {
                    nested(partner, value.into(), &mut doc);
                }
            }
            nested(k.path, serde_yaml::from_str(example).unwrap(), &mut doc);
            if let Err(e) = parse(&doc) {
                panic!("{}: example {example} is refused: {e}", k.path);
            }
        }
    }

    #[test]
    fn every_field_of_the_schema_is_listed() {
        // serde names every field of a section when it meets an unknown one.
        let mut sections: BTreeSet<String> = all_keys()
            .filter_map(|k| {
                let parent = k.path.rsplit_once('.')?.0;
                Some(parent.to_string())
            })
            .collect();
        sections.insert("gateway".into());
        for section in &sections {
            let mut doc = base();
            nested(&format!("{section}.zz_probe"), Value::from(1), &mut doc);
            let err = parse(&doc).expect_err(section).to_string();
            let expected = err
                .split_once("expected ")
                .unwrap_or_else(|| panic!("{section}: {err}"))
                .1;
            let expected = expected.split(" at line").next().unwrap();
            let fields: BTreeSet<&str> = expected.split('`').skip(1).step_by(2).collect();
            assert_eq!(
                fields,
                children(section),
                "{section}: the schema's fields (left) and the reference (right) differ"
            );
        }
    }

    #[test]
    fn sections_group_keys_under_their_prefix() {
        let mut seen = BTreeSet::new();
        for section in reference() {
            for k in section.keys {
                assert!(k.path.starts_with(section.prefix), "{}", k.path);
                assert!(seen.insert(k.path), "{} is listed twice", k.path);
                assert!(!k.doc.contains('\n'), "{}", k.path);
            }
        }
    }
}

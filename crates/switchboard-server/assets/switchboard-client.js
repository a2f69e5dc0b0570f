// switchboard-client.js: a small, dependency-free client for a Switchboard gateway.
//
// Wraps a WebSocket: reconnects with exponential backoff and jitter, dispatches the gateway's
// `{type, payload}` frames by type, and sends `{type, payload}` frames. A message is handed to
// a socket at most once: nothing is resent after a reconnect. While disconnected, `send`
// drops the message, or keeps it in a small outbox (option `outbox`) that is sent once, on
// the next connection. Given a `token` function, it keeps the socket's token fresh in-band
// (`{"type":"$refresh","payload":{"token":...}}`), so the gateway does not close the socket
// when its first token expires (close code 4001, after which it reconnects as after any
// close).
//
//   import { SwitchboardClient } from '/switchboard-client.js';
//   const client = new SwitchboardClient('wss://example.com/connect?namespace=acme');
//   client.on('onconnect', (payload) => console.log('welcome', payload));
//   client.on('error', (payload) => console.warn(payload.message));
//   client.onStatus((s) => console.log(s.state)); // connecting, open, reconnecting, closed
//   client.connect();
//   client.send('chat.say', { text: 'hi' });       // 'sent', 'queued' or 'dropped'
//   client.close();                                // no more reconnects
//
// When a WebSocket cannot be opened (no WebSocket class, or a proxy that breaks the upgrade)
// it falls back by itself to the gateway's Server-Sent Events transport (`socket.sse` in the
// config): an EventSource stream down, one POST per message up, the same frames both ways.
// `client.transport` says which one it is on ('websocket' or 'sse'), and so does every status.
//
// Served by `switchboard serve --demo` at /switchboard-client.js; works in browsers and in
// Node.js 22+ (or pass `WebSocket` in the options).

/** Default backoff: 250 ms doubling to 10 s, each delay shortened by up to half at random. */
export const DEFAULT_BACKOFF = Object.freeze({ initialMs: 250, maxMs: 10000, factor: 2, jitter: 0.5 });

/**
 * The delay before reconnect attempt `attempt` (0 for the first retry): exponential, capped,
 * with "equal jitter": a random part of up to `jitter` of it is taken off, so that many
 * clients dropped at once do not come back at once.
 */
export function backoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const { initialMs, maxMs, factor, jitter } = { ...DEFAULT_BACKOFF, ...backoff };
  const base = Math.min(maxMs, initialMs * factor ** Math.max(0, attempt));
  return Math.round(base * (1 - jitter * random()));
}

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 3;

/**
 * The SSE URL for a socket URL: `ws://host/connect?q` → `http://host/connect/sse?q` (the
 * gateway's default `socket.sse.path`).
 */
export function sseUrlFor(url) {
  const u = new URL(url, globalThis.location?.href);
  u.protocol = u.protocol === 'wss:' ? 'https:' : u.protocol === 'ws:' ? 'http:' : u.protocol;
  u.pathname = u.pathname.replace(/\/$/, '') + '/sse';
  return u.toString();
}

/**
 * The gateway's Server-Sent Events transport behind a WebSocket's face (readyState, onopen,
 * onmessage, onclose, send, close), so the client drives either the same way. Messages are
 * POSTed one at a time, in order (a refused post closes it: 413 as 1009, 400 as 1007, 403 as
 * 1008, others 1006); the gateway's `close` event, or a lost stream (1006), close it too.
 */
export class SseSocket {
  constructor(url, { EventSource = globalThis.EventSource, fetch = globalThis.fetch } = {}) {
    this.url = url;
    this.readyState = CONNECTING;
    this._fetch = fetch;
    this._postUrl = null;
    this._chain = Promise.resolve();
    this._es = new EventSource(url, { withCredentials: true });
    this._es.addEventListener('session', (ev) => {
      if (this.readyState !== CONNECTING) return;
      let session;
      try { session = JSON.parse(ev.data); } catch { return this._end(1002, 'bad session event'); }
      this._postUrl = new URL(session.post, url).toString();
      this.readyState = OPEN;
      this.onopen?.({});
    });
    this._es.addEventListener('close', (ev) => {
      let info = {};
      try { info = JSON.parse(ev.data); } catch { /* no details */ }
      this._end(info.code ?? 1005, info.reason ?? '');
    });
    this._es.onmessage = (ev) => {
      if (this.readyState === OPEN) this.onmessage?.({ data: ev.data });
    };
    // EventSource would reconnect by itself, as a new session; the client decides instead.
    this._es.onerror = () => this._end(1006, '');
  }

  send(text) {
    if (this.readyState !== OPEN) throw new Error('SseSocket is not open');
    this._enqueue(() => this._post(this._postUrl, { method: 'POST', body: text }));
  }

  close(code = 1000, reason = '') {
    if (this.readyState >= 2) return;
    const url = this._postUrl;
    this._end(code, reason);
    // After what was sent before it, as a close frame follows a socket's frames.
    if (url) {
      const target = `${url}&code=${code}&reason=${encodeURIComponent(reason)}`;
      this._chain = this._chain
        .then(() => this._fetch(target, { method: 'DELETE', credentials: 'same-origin', keepalive: true }))
        .catch(() => {});
    }
  }

  /** Runs `post` after every earlier one (messages keep their order). */
  _enqueue(post) {
    this._chain = this._chain.then(() => (this.readyState === OPEN ? post() : undefined));
  }

  /** One message; a refusal ends the socket with the code a WebSocket would get. While the
   *  gateway holds the session at its connect gate it answers 503: wait and post again. */
  async _post(url, init) {
    for (let attempt = 0; ; attempt++) {
      let res;
      try {
        res = await this._fetch(url, {
          ...init, credentials: 'same-origin', headers: { 'content-type': 'text/plain;charset=utf-8' },
        });
      } catch {
        return this._end(1006, '');
      }
      if (res.status >= 200 && res.status < 300) return;
      if (res.status === 503 && attempt < 30 && this.readyState === OPEN) {
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      const codes = { 413: 1009, 400: 1007, 403: 1008 };
      return this._end(codes[res.status] ?? 1006, '');
    }
  }

  _end(code, reason) {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    this._es.close();
    this.onclose?.({ code, reason });
  }
}

/** The gateway closes a socket whose token expired with this code (`auth.close_on_expiry`). */
export const TOKEN_EXPIRED_CODE = 4001;

export class SwitchboardClient {
  /**
   * @param {string | (() => string)} url the gateway's socket URL, or a function giving it
   *   (called before each attempt).
   * @param {object} [options]
   * @param {object} [options.backoff] overrides of DEFAULT_BACKOFF.
   * @param {number} [options.outbox=0] messages kept while disconnected, sent once on the next
   *   connection (the oldest are dropped first when it is full). 0: `send` drops them.
   * @param {number} [options.stableMs=2000] a connection open this long resets the backoff.
   * @param {(info: {reconnect: boolean}) => (void | Promise<void>)} [options.beforeConnect]
   *   runs before each attempt, e.g. to refresh a token cookie; if it throws, the attempt
   *   counts as failed and is retried with backoff.
   * @param {(ev: {code: number, reason: string}) => boolean} [options.shouldReconnect]
   *   whether to reconnect after a close; default: always (until `close()`).
   * @param {() => (string | Promise<string>)} [options.token] returns a fresh token for the
   *   same user. When given, the client sends it as soon as a socket opens and again
   *   `refreshBeforeMs` before each token's expiry, which the gateway reports in its
   *   `$refreshed` answer; a refused refresh (an `error` frame about `$refresh`) or a throwing
   *   `token` is retried every `retryRefreshMs` while the socket stays open.
   * @param {number} [options.refreshBeforeMs=30000] how long before expiry to refresh.
   * @param {number} [options.retryRefreshMs=5000] delay before retrying a failed refresh.
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class to use.
   * @param {string | false | (() => string)} [options.sse] the Server-Sent Events URL to fall
   *   back to when a WebSocket cannot be opened; default: derived from the socket URL
   *   (`sseUrlFor`); false: never fall back.
   * @param {typeof EventSource} [options.EventSource] the EventSource class to use.
   * @param {typeof fetch} [options.fetch] the fetch function to use (SSE posts).
   * @param {() => number} [options.random] a source of randomness in [0, 1), for tests.
   * @param {() => number} [options.now] the clock in milliseconds (Date.now), for tests.
   */
  constructor(url, options = {}) {
    this._url = url;
    this._backoff = { ...DEFAULT_BACKOFF, ...(options.backoff || {}) };
    this._outboxMax = Math.max(0, options.outbox ?? 0);
    this._stableMs = options.stableMs ?? 2000;
    this._beforeConnect = options.beforeConnect;
    this._shouldReconnect = options.shouldReconnect || (() => true);
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._sse = options.sse === undefined ? 'auto' : options.sse;
    this._EventSource = options.EventSource || globalThis.EventSource;
    this._fetch = options.fetch || globalThis.fetch?.bind(globalThis);
    this._transport = null;
    this._random = options.random || Math.random;
    this._token = options.token;
    this._refreshBeforeMs = options.refreshBeforeMs ?? 30000;
    this._retryRefreshMs = options.retryRefreshMs ?? 5000;
    this._now = options.now || Date.now;
    this._refreshTimer = null;
    this._handlers = new Map();
    this._statusHandlers = new Set();
    this._outbox = [];
    this._ws = null;
    this._attempt = 0;
    this._retryTimer = null;
    this._stableTimer = null;
    this._started = false;
    this._stopped = false;
    this._generation = 0; // bumped on close(): late callbacks of older sockets are ignored
  }

  /** Calls `fn(payload, frame)` for every frame of `type` (`'*'`: every frame). Returns an unsubscribe function. */
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }

  /** Removes a handler added with `on`. */
  off(type, fn) {
    this._handlers.get(type)?.delete(fn);
  }

  /**
   * Calls `fn(status)` on every change: `{state: 'connecting' | 'open' | 'reconnecting' | 'closed',
   * attempt, delayMs?, code?, reason?, error?}`. Returns an unsubscribe function.
   */
  onStatus(fn) {
    this._statusHandlers.add(fn);
    return () => this._statusHandlers.delete(fn);
  }

  /** The transport of the open socket: 'websocket', 'sse', or null while disconnected. */
  get transport() {
    return this.connected ? this._transport : null;
  }

  /** True while a socket is open. */
  get connected() {
    return !!this._ws && this._ws.readyState === OPEN;
  }

  /** Messages waiting in the outbox. */
  get pending() {
    return this._outbox.length;
  }

  /** Starts connecting (and reconnecting, until `close()`). */
  connect() {
    if (this._started && !this._stopped) return this;
    this._started = true;
    this._stopped = false;
    this._attempt = 0;
    this._open(false);
    return this;
  }

  /**
   * Sends `{type, payload}`. Returns `'sent'` if it was handed to the open socket, `'queued'`
   * if it waits in the outbox for the next connection, `'dropped'` otherwise. Each message is
   * handed to a socket at most once.
   */
  send(type, payload) {
    const text = JSON.stringify(payload === undefined ? { type } : { type, payload });
    if (this.connected) {
      this._ws.send(text);
      return 'sent';
    }
    if (this._outboxMax === 0 || this._stopped) return 'dropped';
    this._outbox.push(text);
    if (this._outbox.length > this._outboxMax) this._outbox.shift();
    return 'queued';
  }

  /** Closes the socket and stops reconnecting; the outbox is emptied. */
  close(code = 1000, reason = 'bye') {
    this._stopped = true;
    this._generation += 1;
    clearTimeout(this._retryTimer);
    clearTimeout(this._stableTimer);
    clearTimeout(this._refreshTimer);
    this._retryTimer = null;
    this._outbox = [];
    const ws = this._ws;
    this._ws = null;
    if (ws && ws.readyState <= OPEN) {
      try { ws.close(code, reason); } catch { /* already closing */ }
    }
    this._status({ state: 'closed', attempt: this._attempt, code, reason });
  }

  async _open(reconnect) {
    const generation = this._generation;
    this._status({ state: 'connecting', attempt: this._attempt });
    try {
      if (this._beforeConnect) await this._beforeConnect({ reconnect });
    } catch (error) {
      if (generation === this._generation) this._retry({ error });
      return;
    }
    if (generation !== this._generation) return;
    // WebSocket first at every attempt (a restart does not leave the client on SSE for good);
    // SSE when there is no WebSocket, or when this attempt's WebSocket never opens.
    const kind = this._canUse('websocket') ? 'websocket' : 'sse';
    if (!this._canUse(kind)) {
      this._retry({ error: new Error('neither WebSocket nor EventSource is available') });
      return;
    }
    this._attach(kind, generation);
  }

  /** Whether `kind` can be tried: its class exists (and, for SSE, it is not turned off). */
  _canUse(kind) {
    if (kind === 'websocket') return typeof this._WebSocket === 'function';
    return this._sse !== false && typeof this._EventSource === 'function' && typeof this._fetch === 'function';
  }

  _sseUrl() {
    if (typeof this._sse === 'function') return this._sse();
    if (typeof this._sse === 'string' && this._sse !== 'auto') return this._sse;
    return sseUrlFor(typeof this._url === 'function' ? this._url() : this._url);
  }

  /** Opens a socket of `kind` and wires it; a WebSocket that closes before it ever opened
   *  falls back to SSE at once (once per attempt). */
  _attach(kind, generation) {
    let ws;
    try {
      if (kind === 'websocket') {
        ws = new this._WebSocket(typeof this._url === 'function' ? this._url() : this._url);
      } else {
        ws = new SseSocket(this._sseUrl(), { EventSource: this._EventSource, fetch: this._fetch });
      }
    } catch (error) {
      if (kind === 'websocket' && this._canUse('sse')) return this._attach('sse', generation);
      this._retry({ error });
      return;
    }
    this._ws = ws;
    let opened = false;
    const current = () => this._ws === ws && generation === this._generation;
    ws.onopen = () => {
      if (!current()) return;
      opened = true;
      this._transport = kind;
      this._stableTimer = setTimeout(() => { this._attempt = 0; }, this._stableMs);
      this._status({ state: 'open', attempt: this._attempt, transport: kind });
      // Taken out before sending: a message is never handed to two sockets.
      const queued = this._outbox;
      this._outbox = [];
      for (const text of queued) ws.send(text);
      if (this._token) this._refresh(ws);
    };
    ws.onmessage = (ev) => {
      if (current()) this._dispatch(ev.data, ws);
    };
    ws.onclose = (ev) => {
      if (!current()) return;
      this._ws = null;
      clearTimeout(this._stableTimer);
      clearTimeout(this._refreshTimer);
      const info = { code: ev.code, reason: ev.reason, transport: kind };
      if (!opened && kind === 'websocket' && !this._stopped && this._canUse('sse')) {
        // The upgrade never completed (a proxy that breaks WebSockets, say): try SSE now.
        this._attach('sse', generation);
        return;
      }
      if (this._stopped || !this._shouldReconnect(info)) {
        this._stopped = true;
        this._status({ state: 'closed', attempt: this._attempt, ...info });
        return;
      }
      this._retry(info);
    };
    // An error is always followed by a close event; nothing to do here.
    ws.onerror = () => {};
  }

  _retry(info) {
    if (this._stopped) return;
    const delayMs = backoffDelay(this._attempt, this._backoff, this._random);
    this._attempt += 1;
    this._status({ state: 'reconnecting', attempt: this._attempt, delayMs, ...info });
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (!this._stopped) this._open(true);
    }, delayMs);
  }

  /** Sends a fresh token on `ws`, if it is still this client's open socket. */
  async _refresh(ws) {
    clearTimeout(this._refreshTimer);
    let token;
    try {
      token = await this._token();
    } catch {
      this._scheduleRefresh(ws, this._retryRefreshMs);
      return;
    }
    if (this._ws !== ws || ws.readyState !== OPEN) return;
    ws.send(JSON.stringify({ type: '$refresh', payload: { token } }));
  }

  _scheduleRefresh(ws, delayMs) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      if (this._ws === ws) this._refresh(ws);
    }, Math.max(0, delayMs));
  }

  /** Plans the next refresh from the gateway's answers to this one. */
  _onRefreshAnswer(frame, ws) {
    if (!this._token) return;
    if (frame.type === '$refreshed' && typeof frame.payload?.exp === 'number') {
      const left = frame.payload.exp * 1000 - this._now();
      // Refresh `refreshBeforeMs` ahead; for a short-lived token, halfway through what is left.
      const delay = left > 2 * this._refreshBeforeMs ? left - this._refreshBeforeMs : left / 2;
      this._scheduleRefresh(ws, delay);
    } else if (frame.type === 'error' && frame.payload?.type === '$refresh') {
      this._scheduleRefresh(ws, this._retryRefreshMs);
    }
  }

  _dispatch(data, ws) {
    if (typeof data !== 'string') return;
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    if (!frame || typeof frame !== 'object' || typeof frame.type !== 'string') return;
    this._onRefreshAnswer(frame, ws);
    for (const key of [frame.type, '*']) {
      for (const fn of this._handlers.get(key) || []) {
        try { fn(frame.payload, frame); } catch (err) { setTimeout(() => { throw err; }); }
      }
    }
  }

  _status(status) {
    for (const fn of this._statusHandlers) {
      try { fn(status); } catch (err) { setTimeout(() => { throw err; }); }
    }
  }
}

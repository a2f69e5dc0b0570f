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

const OPEN = 1;

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
    let ws;
    try {
      const url = typeof this._url === 'function' ? this._url() : this._url;
      ws = new this._WebSocket(url);
    } catch (error) {
      this._retry({ error });
      return;
    }
    this._ws = ws;
    const current = () => this._ws === ws && generation === this._generation;
    ws.onopen = () => {
      if (!current()) return;
      this._stableTimer = setTimeout(() => { this._attempt = 0; }, this._stableMs);
      this._status({ state: 'open', attempt: this._attempt });
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
      const info = { code: ev.code, reason: ev.reason };
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

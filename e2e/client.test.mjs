// Unit tests of crates/switchboard-server/assets/switchboard-client.js with a fake WebSocket,
// a fake EventSource and mocked timers: the backoff schedule, at-most-once sending, dispatch,
// stopping, and the fallback to Server-Sent Events.

import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';

// The helper is a browser ES module; load it as one whatever Node thinks of `.js` files.
const source = await readFile(
  new URL('../crates/switchboard-server/assets/switchboard-client.js', import.meta.url),
  'utf8',
);
const { SwitchboardClient, backoffDelay, DEFAULT_BACKOFF, sseUrlFor } = await import(
  'data:text/javascript;base64,' + Buffer.from(source).toString('base64')
);

/** A WebSocket stand-in the test drives by hand. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(text) {
    assert.equal(this.readyState, 1, 'send on a socket that is not open');
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = '') {
    this.readyState = 3;
    this.closedWith = { code, reason };
  }
  // test controls
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  receive(frame) {
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
  }
}

const last = () => FakeSocket.all.at(-1);

function client(options = {}) {
  const statuses = [];
  const c = new SwitchboardClient('ws://gateway/connect', {
    WebSocket: FakeSocket,
    random: () => 0,
    ...options,
  });
  c.onStatus((s) => statuses.push(s));
  return { c, statuses };
}

beforeEach(() => {
  FakeSocket.all = [];
  mock.timers.enable({ apis: ['setTimeout'] });
});
afterEach(() => mock.timers.reset());

test('backoff doubles from 250 ms up to the cap, jitter only shortens it', () => {
  const none = () => 0;
  const full = () => 0.999999;
  const plain = [0, 1, 2, 3, 4, 5, 6, 10].map((a) => backoffDelay(a, DEFAULT_BACKOFF, none));
  assert.deepEqual(plain, [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]);
  const jittered = [0, 1, 6].map((a) => backoffDelay(a, DEFAULT_BACKOFF, full));
  assert.deepEqual(jittered, [125, 250, 5000]);
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(3, { initialMs: 100, maxMs: 700 });
    assert.ok(d >= 350 && d <= 700, `delay ${d}`);
  }
});

test('reconnects after each drop with growing delays, and resets after a stable connection', () => {
  const { c, statuses } = client({ stableMs: 1000 });
  c.connect();
  assert.equal(FakeSocket.all.length, 1);
  last().drop(); // refused before opening
  assert.deepEqual(statuses.at(-1), {
    state: 'reconnecting', attempt: 1, delayMs: 250, code: 1006, reason: '', transport: 'websocket',
  });
  mock.timers.tick(249);
  assert.equal(FakeSocket.all.length, 1, 'not before the delay');
  mock.timers.tick(1);
  assert.equal(FakeSocket.all.length, 2);
  last().drop();
  assert.equal(statuses.at(-1).delayMs, 500);
  mock.timers.tick(500);
  last().open();
  assert.equal(c.connected, true);
  last().drop(1001, 'going away'); // dropped before it was stable: the backoff goes on
  assert.equal(statuses.at(-1).delayMs, 1000);
  mock.timers.tick(1000);
  last().open();
  mock.timers.tick(1000); // stable
  last().drop(1001);
  assert.equal(statuses.at(-1).delayMs, 250, 'back to the first delay');
  assert.deepEqual(
    statuses.map((s) => s.state),
    ['connecting', 'reconnecting', 'connecting', 'reconnecting', 'connecting', 'open',
      'reconnecting', 'connecting', 'open', 'reconnecting'],
  );
});

test('each message is handed to a socket at most once; the outbox is sent once, on the next connection', () => {
  const { c } = client({ outbox: 2 });
  assert.equal(c.send('early', 1), 'queued'); // before connect()
  c.connect();
  assert.equal(c.send('while.connecting', 2), 'queued'); // the outbox holds 2: 'early' is dropped
  assert.equal(c.send('also.connecting', 3), 'queued');
  assert.equal(c.pending, 2);
  const first = last();
  first.open();
  assert.equal(c.pending, 0);
  assert.equal(c.send('live', 4), 'sent');
  first.drop();
  assert.equal(c.send('offline'), 'queued');
  mock.timers.tick(250);
  const second = last();
  assert.notEqual(first, second);
  second.open();
  assert.deepEqual(first.sent, [
    { type: 'while.connecting', payload: 2 },
    { type: 'also.connecting', payload: 3 },
    { type: 'live', payload: 4 },
  ]);
  assert.deepEqual(second.sent, [{ type: 'offline' }], 'nothing from the first socket is resent');
  second.drop();
  mock.timers.tick(500); // the second delay: the connection never became stable
  assert.equal(FakeSocket.all.length, 3);
  last().open();
  assert.deepEqual(last().sent, [], 'the outbox was emptied when it was sent');
});

test('without an outbox, a message sent while disconnected is dropped, not sent later', () => {
  const { c } = client();
  c.connect();
  assert.equal(c.send('too.early'), 'dropped');
  last().open();
  assert.deepEqual(last().sent, []);
});

test('frames are dispatched by type, bad frames are ignored, handlers can be removed', () => {
  const { c } = client();
  const got = [];
  const off = c.on('chat.said', (payload, frame) => got.push(['said', payload, frame.type]));
  c.on('*', (_payload, frame) => got.push(['any', frame.type]));
  c.connect();
  last().open();
  last().receive({ type: 'chat.said', payload: { text: 'hi' } });
  last().receive({ type: 'other' });
  last().receive('not json');
  last().receive({ payload: 'no type' });
  last().receive('[1,2]');
  off();
  last().receive({ type: 'chat.said', payload: 2 });
  assert.deepEqual(got, [
    ['said', { text: 'hi' }, 'chat.said'],
    ['any', 'chat.said'],
    ['any', 'other'],
    ['any', 'chat.said'],
  ]);
});

test('close() stops reconnecting, even with a retry pending; late events of old sockets are ignored', () => {
  const { c, statuses } = client({ outbox: 5 });
  c.connect();
  const ws = last();
  ws.open();
  ws.drop();
  assert.equal(statuses.at(-1).state, 'reconnecting');
  c.close();
  assert.equal(statuses.at(-1).state, 'closed');
  mock.timers.tick(60_000);
  assert.equal(FakeSocket.all.length, 1, 'no new socket after close()');
  assert.equal(c.send('after.close'), 'dropped');
  ws.receive({ type: 'late' }); // ignored
  // and an open socket is closed with 1000
  c.connect();
  last().open();
  c.close();
  assert.deepEqual(last().closedWith, { code: 1000, reason: 'bye' });
});

test('beforeConnect runs before every attempt, and a failure is retried with backoff', async () => {
  const calls = [];
  let fail = true;
  const { c, statuses } = client({
    beforeConnect: async (info) => {
      calls.push(info.reconnect);
      if (fail) throw new Error('login failed');
    },
  });
  c.connect();
  await Promise.resolve();
  await Promise.resolve();
  assert.equal(FakeSocket.all.length, 0);
  assert.equal(statuses.at(-1).state, 'reconnecting');
  assert.equal(statuses.at(-1).error.message, 'login failed');
  fail = false;
  mock.timers.tick(250);
  await Promise.resolve();
  await Promise.resolve();
  assert.equal(FakeSocket.all.length, 1);
  assert.deepEqual(calls, [false, true]);
});

test('shouldReconnect can refuse, e.g. after a policy close', () => {
  const { c, statuses } = client({ shouldReconnect: ({ code }) => code !== 1008 });
  c.connect();
  last().open();
  last().drop(1008, 'connection refused by handler');
  assert.deepEqual(statuses.at(-1), {
    state: 'closed', attempt: 0, code: 1008, reason: 'connection refused by handler',
    transport: 'websocket',
  });
  mock.timers.tick(60_000);
  assert.equal(FakeSocket.all.length, 1);
});

/** Lets the client's awaited promises (the token function) settle. */
async function settle() {
  for (let i = 0; i < 5; i++) await Promise.resolve();
}

test('with a token function, the token is refreshed on open and before each expiry', async () => {
  let now = 1_000_000_000_000; // ms
  let issued = 0;
  const { c } = client({
    token: async () => `token-${++issued}`,
    refreshBeforeMs: 30_000,
    now: () => now,
  });
  c.connect();
  last().open();
  await settle();
  assert.deepEqual(last().sent, [{ type: '$refresh', payload: { token: 'token-1' } }]);
  // The gateway says this token lasts 10 minutes: the next refresh comes 30 s before that.
  last().receive({ type: '$refreshed', payload: { exp: now / 1000 + 600 } });
  mock.timers.tick(569_000);
  await settle();
  assert.equal(last().sent.length, 1, 'not yet');
  now += 570_000;
  mock.timers.tick(1_000);
  await settle();
  assert.deepEqual(last().sent.at(-1), { type: '$refresh', payload: { token: 'token-2' } });
  // A short-lived token is refreshed halfway through what is left of it.
  last().receive({ type: '$refreshed', payload: { exp: now / 1000 + 20 } });
  mock.timers.tick(10_000);
  await settle();
  assert.deepEqual(last().sent.at(-1), { type: '$refresh', payload: { token: 'token-3' } });
});

test('a refused refresh is retried while the socket is open, and never after close', async () => {
  let fail = true;
  const { c } = client({
    token: async () => {
      if (fail) throw new Error('idp down');
      return 'fresh';
    },
    retryRefreshMs: 5_000,
  });
  c.connect();
  last().open();
  await settle();
  assert.equal(last().sent.length, 0, 'the token function threw');
  fail = false;
  mock.timers.tick(5_000);
  await settle();
  assert.deepEqual(last().sent, [{ type: '$refresh', payload: { token: 'fresh' } }]);
  // The gateway refuses it (say the IdP returned a stale token): retried.
  last().receive({ type: 'error', payload: { message: 'refresh refused: invalid token: expired', type: '$refresh' } });
  mock.timers.tick(5_000);
  await settle();
  assert.equal(last().sent.length, 2);
  // Closed for an expired token: reconnects as after any close, and refreshes again there.
  last().receive({ type: 'error', payload: { message: 'refresh refused', type: '$refresh' } });
  const first = last();
  first.drop(4001, 'token expired');
  mock.timers.tick(5_000);
  await settle();
  assert.equal(first.sent.length, 2, 'no refresh on a closed socket');
  mock.timers.tick(250);
  assert.equal(FakeSocket.all.length, 2);
  last().open();
  await settle();
  assert.deepEqual(last().sent, [{ type: '$refresh', payload: { token: 'fresh' } }]);
  c.close();
});

test('without a token function nothing is sent on open', () => {
  const { c } = client();
  c.connect();
  last().open();
  last().receive({ type: '$refreshed', payload: { exp: 1 } });
  mock.timers.tick(60_000);
  assert.deepEqual(last().sent, []);
  c.close();
});

/** An EventSource stand-in the test drives by hand. */
class FakeEventSource {
  static all = [];
  constructor(url, init) {
    this.url = url;
    this.init = init;
    this.listeners = {};
    this.closed = false;
    FakeEventSource.all.push(this);
  }
  addEventListener(type, fn) {
    (this.listeners[type] ||= []).push(fn);
  }
  close() {
    this.closed = true;
  }
  // test controls
  emit(type, data) {
    for (const fn of this.listeners[type] || []) fn({ data: JSON.stringify(data) });
  }
  session(id = 'abc') {
    this.emit('session', { session: id, post: `/connect/sse?session=${id}` });
  }
  message(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  fail() {
    this.onerror?.({});
  }
}

function sseClient(options = {}, answer = () => 202) {
  FakeEventSource.all = [];
  const requests = [];
  const fetch = async (url, init) => {
    requests.push({ url: String(url), method: init.method, body: init.body });
    return { status: init.method === 'DELETE' ? 204 : answer(init.body) };
  };
  const made = client({ EventSource: FakeEventSource, fetch, ...options });
  return { ...made, requests };
}

const lastEs = () => FakeEventSource.all.at(-1);

test('the SSE URL is derived from the socket URL', () => {
  assert.equal(sseUrlFor('ws://gateway/connect?namespace=acme'), 'http://gateway/connect/sse?namespace=acme');
  assert.equal(sseUrlFor('wss://gateway/connect/'), 'https://gateway/connect/sse');
});

test('a WebSocket that never opens falls back to SSE in the same attempt; posts go out in order', async () => {
  const { c, statuses, requests } = sseClient();
  const frames = [];
  c.on('*', (p, f) => frames.push(f));
  c.connect();
  last().drop(); // the upgrade failed before opening
  assert.equal(FakeEventSource.all.length, 1, 'SSE at once, no backoff');
  assert.equal(lastEs().url, 'http://gateway/connect/sse');
  assert.equal(c.connected, false);
  lastEs().session('s1');
  assert.equal(c.transport, 'sse');
  assert.deepEqual(statuses.at(-1), { state: 'open', attempt: 0, transport: 'sse' });
  lastEs().message({ type: 'onconnect', payload: { hi: 1 } });
  assert.deepEqual(frames, [{ type: 'onconnect', payload: { hi: 1 } }]);
  assert.equal(c.send('a', 1), 'sent');
  assert.equal(c.send('b', 2), 'sent');
  await settle();
  assert.deepEqual(
    requests.map((r) => [r.method, r.url, JSON.parse(r.body)]),
    [
      ['POST', 'http://gateway/connect/sse?session=s1', { type: 'a', payload: 1 }],
      ['POST', 'http://gateway/connect/sse?session=s1', { type: 'b', payload: 2 }],
    ],
  );
  c.close(4000, 'bye');
  assert.ok(lastEs().closed);
  await settle(); // after the posts before it
  assert.equal(requests.at(-1).method, 'DELETE');
  assert.equal(requests.at(-1).url, 'http://gateway/connect/sse?session=s1&code=4000&reason=bye');
});

test('without a WebSocket class the client uses SSE; a close event reconnects, trying WebSocket first', () => {
  // No WebSocket anywhere (Node 22 has a global one).
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = undefined;
  let made;
  try {
    made = sseClient({ WebSocket: undefined });
  } finally {
    globalThis.WebSocket = saved;
  }
  const { c, statuses } = made;
  c.connect();
  assert.equal(FakeSocket.all.length, 0);
  lastEs().session();
  assert.equal(c.transport, 'sse');
  lastEs().emit('close', { code: 1008, reason: 'send queue full' });
  assert.ok(lastEs().closed, 'EventSource does not reconnect by itself');
  assert.deepEqual(statuses.at(-1), {
    state: 'reconnecting', attempt: 1, delayMs: 250, code: 1008, reason: 'send queue full', transport: 'sse',
  });
  assert.equal(c.transport, null);
});

test('a lost SSE stream reconnects with backoff; sse: false never falls back', () => {
  const { c, statuses } = sseClient();
  c.connect();
  last().drop();
  lastEs().fail(); // the fallback failed too (the server is down)
  assert.deepEqual(statuses.at(-1), {
    state: 'reconnecting', attempt: 1, delayMs: 250, code: 1006, reason: '', transport: 'sse',
  });
  mock.timers.tick(250);
  assert.equal(FakeSocket.all.length, 2, 'the next attempt tries WebSocket first');
  last().open();
  assert.equal(c.transport, 'websocket');
  c.close();

  const off = sseClient({ sse: false });
  off.c.connect();
  last().drop();
  assert.equal(FakeEventSource.all.length, 0);
  assert.equal(off.statuses.at(-1).state, 'reconnecting');
  off.c.close();
});

test('a refused post closes the SSE socket with the code a WebSocket would get', async () => {
  const { c, statuses } = sseClient({}, (body) => (body.length > 20 ? 413 : 202));
  c.connect();
  last().drop();
  lastEs().session();
  c.send('small');
  c.send('big', 'x'.repeat(100));
  c.send('never', 1);
  await settle();
  assert.equal(c.connected, false);
  assert.deepEqual(statuses.at(-1), {
    state: 'reconnecting', attempt: 1, delayMs: 250, code: 1009, reason: '', transport: 'sse',
  });
  c.close();
});

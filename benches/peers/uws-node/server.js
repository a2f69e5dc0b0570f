// Switchboard's load-benchmark peer: the same gateway work as `bench-server`, on
// uWebSockets.js (the npm copy @trufflesuite/uws-js-unofficial; the official package is not on
// the npm registry). Refuses to run on the package's slow pure-JS fallback.
//
//   SWITCHBOARD_JWT_SECRET=... node server.js PORT
//
// Same work, same JSON, as benches/src/bin/bench-server.rs (see ../ws-node/server.js):
// HS256 JWT verified before the upgrade (cookie ID_TOKEN or `Authorization: Bearer`, `exp`
// required, username in `preferred_username`), sockets indexed by username, `echo` replies,
// `broadcast` reaches every socket (uWS's own pub/sub: one topic all sockets subscribe to,
// the idiomatic and fastest way in uWS), `send` reaches every socket of user `to`.
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const jwt = require('jsonwebtoken');

const pkgDir = path.dirname(require.resolve('@trufflesuite/uws-js-unofficial/package.json'));
const native = path.join(
  pkgDir,
  'binaries',
  `uws_${process.platform}_${process.arch}_${process.versions.modules}.node`,
);
if (!fs.existsSync(native) || process.env.UWS_USE_FALLBACK) {
  console.error(`no native uWebSockets.js build for this Node (${native}); refusing the JS fallback`);
  process.exit(3);
}
const uWS = require(native);

const port = Number(process.argv[2] || process.env.PORT || 0);
const secret = process.env.SWITCHBOARD_JWT_SECRET;
if (!secret || secret.length < 16) {
  console.error('SWITCHBOARD_JWT_SECRET must hold at least 16 bytes');
  process.exit(2);
}
// One key object for every verification: jsonwebtoken turns a string secret into a new
// KeyObject on each call, which costs ~0.8 ms here (30x the verification itself).
const key = crypto.createSecretKey(Buffer.from(secret));

// --- the bus: topic -> handlers ---------------------------------------------------------
const topics = new Map();
function addHandler(topic, handler) {
  if (!topics.has(topic)) topics.set(topic, []);
  topics.get(topic).push(handler);
}
function publish(topic, msg) {
  const handlers = topics.get(topic);
  if (!handlers) return;
  for (const h of handlers) {
    try {
      h(msg);
    } catch (e) {
      msg.fail({ message: 'internal error in a handler', topic });
    }
  }
}
const routes = new Map([
  ['echo', 'bench:echo'],
  ['broadcast', 'bench:broadcast'],
  ['send', 'bench:send'],
]);

// --- the registry: username -> sockets ----------------------------------------------------
const byUser = new Map();
const ALL = 'all';
function frame(type, payload) {
  return JSON.stringify({ type, payload });
}

// --- handlers -----------------------------------------------------------------------------
addHandler('bench:echo', (msg) => msg.reply(msg.data.payload));
addHandler('bench:broadcast', (msg) => {
  app.publish(ALL, frame('bench.broadcast', msg.data.payload), false);
});
addHandler('bench:send', (msg) => {
  if (typeof msg.data.to !== 'string') return msg.fail({ message: 'send needs a string `to`' });
  const set = byUser.get(msg.data.to);
  if (!set) return;
  const buf = Buffer.from(frame('bench.send', msg.data.payload));
  for (const ws of set) ws.send(buf, false);
});

// --- identity -----------------------------------------------------------------------------
function tokenFrom(cookie, auth) {
  if (cookie) {
    for (const pair of cookie.split(';')) {
      const i = pair.indexOf('=');
      if (i > 0 && pair.slice(0, i).trim() === 'ID_TOKEN') {
        const v = pair.slice(i + 1).trim();
        if (v) return v;
      }
    }
  }
  if (auth && auth.startsWith('Bearer ')) return auth.slice(7).trim() || null;
  return null;
}
function verify(cookie, auth) {
  const token = tokenFrom(cookie, auth);
  if (!token) return null;
  try {
    const claims = jwt.verify(token, key, { algorithms: ['HS256'] });
    if (typeof claims.exp !== 'number') return null;
    const username = claims.preferred_username;
    if (typeof username !== 'string' || username === '') return null;
    return { username, claims };
  } catch (e) {
    return null;
  }
}

// --- the server ---------------------------------------------------------------------------
const app = uWS.App();
app.ws('/connect', {
  compression: uWS.DISABLED,
  maxPayloadLength: 64 * 1024,
  idleTimeout: 60,
  sendPingsAutomatically: true,
  upgrade: (res, req, context) => {
    // The request is only valid in this callback: read everything first.
    const key = req.getHeader('sec-websocket-key');
    const protocol = req.getHeader('sec-websocket-protocol');
    const extensions = req.getHeader('sec-websocket-extensions');
    const identity = verify(req.getHeader('cookie'), req.getHeader('authorization'));
    if (!identity) {
      res.writeStatus('401 Unauthorized').writeHeader('WWW-Authenticate', 'Bearer').end('invalid token\n');
      return;
    }
    const namespace = req.getQuery('namespace') || null;
    res.upgrade(
      { username: identity.username, namespace, jwt: identity.claims },
      key,
      protocol,
      extensions,
      context,
    );
  },
  open: (ws) => {
    const data = ws.getUserData();
    let set = byUser.get(data.username);
    if (!set) byUser.set(data.username, (set = new Set()));
    set.add(ws);
    data.set = set;
    ws.subscribe(ALL);
  },
  message: (ws, message, isBinary) => {
    if (isBinary) {
      ws.send(frame('error', { message: 'binary messages are not supported; send JSON text' }), false);
      return;
    }
    let parsed;
    try {
      parsed = JSON.parse(Buffer.from(message).toString('utf8'));
    } catch (e) {
      ws.send(frame('error', { message: 'message is not valid JSON: ' + e.message }), false);
      return;
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed) || typeof parsed.type !== 'string') {
      ws.send(frame('error', { message: 'message must be a JSON object with a string `type`' }), false);
      return;
    }
    const topic = routes.get(parsed.type);
    if (!topic) return;
    publish(topic, {
      topic,
      data: parsed,
      context: ws.getUserData(),
      reply: (payload) => ws.send(frame(topic, payload), false),
      fail: (error) => ws.send(frame('error', error), false),
    });
  },
  close: (ws) => {
    const data = ws.getUserData();
    data.set.delete(ws);
    if (data.set.size === 0) byUser.delete(data.username);
  },
});
app.any('/*', (res) => {
  res.writeStatus('404 Not Found').end('not found\n');
});
app.listen('127.0.0.1', port, (token) => {
  if (!token) {
    console.error(`cannot listen on 127.0.0.1:${port}`);
    process.exit(1);
  }
  console.log(`listening ${uWS.us_socket_local_port(token)}`);
});
process.on('SIGTERM', () => process.exit(0));

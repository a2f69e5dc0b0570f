// Switchboard's load-benchmark peer: the same gateway work as `bench-server`, on Node.js
// with the `ws` package (the spec's own implementation).
//
//   SWITCHBOARD_JWT_SECRET=... node server.js PORT
//
// Same work, same JSON, as benches/src/bin/bench-server.rs:
// - upgrades only at /connect, after verifying an HS256 JWT (cookie ID_TOKEN, else
//   `Authorization: Bearer`; `exp` required; username in `preferred_username`), else 401;
// - each socket is indexed by username (and the set of all sockets);
// - a text frame must be a JSON object with a string `type`, else an error frame;
// - type `echo`      -> topic `bench:echo`:      reply {"type":"bench:echo","payload":p};
//   type `broadcast` -> topic `bench:broadcast`: {"type":"bench.broadcast","payload":p}
//                       to every socket, encoded once;
//   type `send`      -> topic `bench:send`:      {"type":"bench.send","payload":p} to every
//                       socket of user `to`, encoded once;
// - heartbeat: a ping every 30 s, a socket that missed the previous pong is dropped.
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');
const crypto = require('crypto');
const jwt = require('jsonwebtoken');

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
function frame(type, payload) {
  return Buffer.from(JSON.stringify({ type, payload }));
}
function sendToUser(username, buf) {
  const set = byUser.get(username);
  if (!set) return;
  for (const ws of set) ws.send(buf, { binary: false });
}

// --- handlers -----------------------------------------------------------------------------
addHandler('bench:echo', (msg) => msg.reply(msg.data.payload));
addHandler('bench:broadcast', (msg) => {
  const buf = frame('bench.broadcast', msg.data.payload);
  for (const ws of wss.clients) ws.send(buf, { binary: false });
});
addHandler('bench:send', (msg) => {
  if (typeof msg.data.to !== 'string') return msg.fail({ message: 'send needs a string `to`' });
  sendToUser(msg.data.to, frame('bench.send', msg.data.payload));
});

// --- identity -----------------------------------------------------------------------------
function tokenFrom(req) {
  const cookie = req.headers.cookie;
  if (cookie) {
    for (const pair of cookie.split(';')) {
      const i = pair.indexOf('=');
      if (i > 0 && pair.slice(0, i).trim() === 'ID_TOKEN') {
        const v = pair.slice(i + 1).trim();
        if (v) return v;
      }
    }
  }
  const auth = req.headers.authorization;
  if (auth && auth.startsWith('Bearer ')) return auth.slice(7).trim() || null;
  return null;
}
function verify(req) {
  const token = tokenFrom(req);
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
const server = http.createServer((req, res) => {
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not found\n');
});
const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024, perMessageDeflate: false });

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname !== '/connect') {
    socket.end('HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n');
    return;
  }
  const identity = verify(req);
  if (!identity) {
    socket.end('HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer\r\nConnection: close\r\n\r\n');
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    open(ws, identity, url.searchParams.get('namespace') || null);
  });
});

function open(ws, identity, namespace) {
  const context = { username: identity.username, namespace, jwt: identity.claims };
  ws.isAlive = true;
  let set = byUser.get(identity.username);
  if (!set) byUser.set(identity.username, (set = new Set()));
  set.add(ws);
  ws.on('pong', () => {
    ws.isAlive = true;
  });
  ws.on('message', (data, isBinary) => {
    if (isBinary) {
      ws.send(frame('error', { message: 'binary messages are not supported; send JSON text' }));
      return;
    }
    let parsed;
    try {
      parsed = JSON.parse(data);
    } catch (e) {
      ws.send(frame('error', { message: 'message is not valid JSON: ' + e.message }));
      return;
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed) || typeof parsed.type !== 'string') {
      ws.send(frame('error', { message: 'message must be a JSON object with a string `type`' }));
      return;
    }
    const topic = routes.get(parsed.type);
    if (!topic) return;
    publish(topic, {
      topic,
      data: parsed,
      context,
      reply: (payload) => ws.send(frame(topic, payload), { binary: false }),
      fail: (error) => ws.send(frame('error', error), { binary: false }),
    });
  });
  ws.on('close', () => {
    set.delete(ws);
    if (set.size === 0) byUser.delete(identity.username);
  });
  ws.on('error', () => {});
}

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) {
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, 30000);
heartbeat.unref();

server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
process.on('SIGTERM', () => process.exit(0));

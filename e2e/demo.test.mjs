// The demo chat in a real browser: Debian's headless Chromium driven by playwright-core,
// against the real `switchboard serve --demo` binary on 127.0.0.1.
//
// Two users in one namespace chat (say and whisper), a third in another namespace sees
// nothing of it, every page shows who is online, and the pages reconnect by themselves after
// the server restarts on the same port; a message typed while it is down is sent once, after.
//
// Screenshots go to e2e/screenshots/: one per page at the end, and `failure-*.png` when a
// step fails. Run with `cargo xtask e2e` (builds the binary, installs Chromium and the npm
// package when missing), or `npm test` here with SWITCHBOARD_BIN set.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..');
const BIN = process.env.SWITCHBOARD_BIN || path.join(root, 'target/debug/switchboard');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SHOTS = path.join(here, 'screenshots');
const WAIT = 10_000;

/** Starts `switchboard serve --demo` on `listen`; resolves with the address it printed. */
function startServer(listen) {
  return new Promise((resolve, reject) => {
    const proc = spawn(
      BIN,
      ['serve', '--demo', '--listen', listen, '--config', path.join(root, 'conf/socket.yaml')],
      {
        // an empty secret variable: the demo uses its own, the same after a restart
        env: { ...process.env, RUST_LOG: 'warn', SWITCHBOARD_JWT_SECRET: '' },
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error('the server printed no address within 10 s'));
    }, WAIT);
    proc.once('error', (e) => { clearTimeout(timer); reject(e); });
    proc.once('exit', (code) => { clearTimeout(timer); reject(new Error(`the server exited (${code})`)); });
    createInterface({ input: proc.stdout }).on('line', (line) => {
      const m = line.match(/^switchboard: listening on ws:\/\/(\S+)\/connect$/);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, addr: m[1] });
      }
    });
  });
}

/** SIGTERM, and SIGKILL if it has not exited within 10 s. Resolves with the exit code. */
async function stopServer(server) {
  if (server.proc.exitCode !== null) return server.proc.exitCode;
  const exited = new Promise((resolve) => server.proc.once('exit', (code) => resolve(code)));
  server.proc.kill('SIGTERM');
  const timer = setTimeout(() => server.proc.kill('SIGKILL'), WAIT);
  const code = await exited;
  clearTimeout(timer);
  return code;
}

/** Polls `fn` until it returns a truthy value (or throws the last assertion after `ms`). */
async function eventually(fn, ms = WAIT) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      const v = await fn();
      if (v !== false) return v;
      if (Date.now() > deadline) throw new Error('condition never held');
    } catch (err) {
      if (Date.now() > deadline) throw err;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

let server;
let browser;
const users = [];
const pageErrors = [];

before(async () => {
  await mkdir(SHOTS, { recursive: true });
  server = await startServer('127.0.0.1:0');
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Playwright gives every launch a fresh, empty --user-data-dir of its own.
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
});

after(async () => {
  await browser?.close();
  if (server) await stopServer(server);
});

async function join(name, namespace, initScript) {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  if (initScript) await context.addInitScript(initScript);
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(`${name}: ${e.message}`));
  await page.goto(`http://${server.addr}/`);
  await page.fill('#username', name);
  await page.fill('#namespace', namespace);
  await page.click('#join');
  await page.waitForSelector('body[data-state="connected"]', { timeout: WAIT });
  const user = { name, page };
  users.push(user);
  return user;
}

async function type(user, text, to = '') {
  await user.page.fill('#to', to);
  await user.page.fill('#text', text);
  await user.page.press('#text', 'Enter');
}

const log = (user) => user.page.locator('#log .msg').allTextContents();
const online = (user) => user.page.locator('#online li').allTextContents();
const count = async (user, line) => (await log(user)).filter((l) => l === line).length;

async function sees(user, line) {
  await user.page.locator('#log .msg', { hasText: line }).first().waitFor({ timeout: WAIT });
}

async function shoot(prefix) {
  for (const u of users) {
    await u.page.screenshot({ path: path.join(SHOTS, `${prefix}${u.name}.png`) }).catch(() => {});
  }
}

test('two users chat in one namespace, a third elsewhere sees nothing, pages reconnect after a restart', { timeout: 120_000 }, async () => {
  try {
    const alex = await join('alex', 'acme');
    const sam = await join('sam', 'acme');
    const kim = await join('kim', 'globex');

    // who is online, per namespace
    await eventually(async () => assert.deepEqual(await online(alex), ['alex', 'sam']));
    await eventually(async () => assert.deepEqual(await online(sam), ['alex', 'sam']));
    assert.deepEqual(await online(kim), ['kim']);
    assert.equal(await alex.page.textContent('#online-count'), '2');
    // the client helper refreshed each page's token in-band (`$refreshed` from the gateway)
    for (const u of [alex, sam, kim]) {
      await u.page.waitForSelector('body[data-token-exp]', { timeout: WAIT });
      const exp = Number(await u.page.getAttribute('body', 'data-token-exp'));
      assert.ok(exp > Date.now() / 1000 + 3000, `a fresh one-hour token: ${exp}`);
    }

    // say: both in acme see it
    await type(alex, 'hello acme');
    await sees(sam, 'alex: hello acme');
    await sees(alex, 'alex: hello acme');
    // whisper: to alex, with a copy to sam
    await type(sam, 'psst, alex', 'alex');
    await sees(alex, '(whisper) sam: psst, alex');
    await sees(sam, '(whisper) sam: psst, alex');
    // a whisper across namespaces reaches nobody
    await type(alex, 'kim, are you there?', 'kim');
    await sees(alex, '(whisper) alex: kim, are you there?'); // the sender's copy only
    await type(kim, 'only globex hears this');
    await sees(kim, 'kim: only globex hears this');
    assert.deepEqual(await log(kim), ['kim: only globex hears this'], 'kim saw nothing of acme');
    assert.ok(!(await log(alex)).some((l) => l.includes('globex')), 'acme saw nothing of globex');

    // restart on the same port: every page notices, reconnects by itself and logs in again
    const port = server.addr.split(':').at(-1);
    assert.equal(await stopServer(server), 0, 'clean shutdown');
    for (const u of users) {
      await u.page.waitForSelector('body[data-state="reconnecting"]', { timeout: WAIT });
    }
    await type(alex, 'typed while the server was down');
    assert.match(await alex.page.textContent('#status'), /will be sent/);
    await shoot('restarting-');
    server = await startServer(`127.0.0.1:${port}`);
    for (const u of users) {
      await u.page.waitForSelector('body[data-state="connected"]', { timeout: 20_000 });
    }
    await eventually(async () => assert.deepEqual(await online(sam), ['alex', 'sam']));
    await eventually(async () => assert.deepEqual(await online(kim), ['kim']));

    // the queued message went out exactly once; nothing from before was sent again
    await sees(alex, 'alex: typed while the server was down');
    await type(alex, 'back again');
    await sees(sam, 'alex: back again');
    await sees(alex, 'alex: back again');
    await new Promise((r) => setTimeout(r, 300)); // room for a duplicate to show up
    assert.equal(await count(alex, 'alex: typed while the server was down'), 1);
    assert.equal(await count(alex, 'alex: hello acme'), 1);
    assert.equal(await count(sam, 'alex: hello acme'), 1);
    assert.equal(await count(sam, 'alex: back again'), 1);
    assert.deepEqual(await log(kim), ['kim: only globex hears this'], 'kim still saw nothing');
    assert.deepEqual(pageErrors, [], 'no uncaught errors in the pages');
    await shoot('');
  } catch (err) {
    await shoot('failure-');
    throw err;
  }
});

test('a page without WebSockets, and one whose WebSocket never opens, chat over SSE with a WebSocket page', { timeout: 60_000 }, async () => {
  try {
    const lee = await join('lee', 'fallback', () => { delete window.WebSocket; });
    const max = await join('max', 'fallback', () => {
      // As behind a proxy that breaks the upgrade: every WebSocket fails before it opens.
      window.WebSocket = class {
        constructor() {
          this.readyState = 0;
          setTimeout(() => { this.readyState = 3; this.onerror?.({}); this.onclose?.({ code: 1006, reason: '' }); }, 20);
        }
        send() { throw new Error('not open'); }
        close() {}
      };
    });
    const ada = await join('ada', 'fallback');
    assert.equal(await lee.page.getAttribute('body', 'data-transport'), 'sse');
    assert.equal(await max.page.getAttribute('body', 'data-transport'), 'sse');
    assert.equal(await ada.page.getAttribute('body', 'data-transport'), 'websocket');
    assert.match(await lee.page.textContent('#status'), /\(sse\)/);
    await eventually(async () => assert.deepEqual(await online(ada), ['ada', 'lee', 'max']));
    await eventually(async () => assert.deepEqual(await online(lee), ['ada', 'lee', 'max']));

    await type(lee, 'hello from sse');
    await sees(ada, 'lee: hello from sse');
    await sees(max, 'lee: hello from sse');
    await type(ada, 'hello from websocket');
    await sees(lee, 'ada: hello from websocket');
    await type(ada, 'psst, lee', 'lee');
    await sees(lee, '(whisper) ada: psst, lee');
    await type(lee, 'psst, ada', 'ada');
    await sees(ada, '(whisper) lee: psst, ada');
    await sees(lee, '(whisper) lee: psst, ada');
    // messages sent in a burst arrive once each, in order
    for (const n of [1, 2, 3]) await type(max, `burst ${n}`);
    await sees(ada, 'max: burst 3');
    const burst = (await log(ada)).filter((l) => l.startsWith('max: burst'));
    assert.deepEqual(burst, ['max: burst 1', 'max: burst 2', 'max: burst 3']);
    assert.ok(!(await log(max)).some((l) => l.includes('psst')), 'whispers reach only their users');
    // the in-band token refresh works over SSE too
    await lee.page.waitForSelector('body[data-token-exp]', { timeout: WAIT });
    assert.deepEqual(pageErrors, [], 'no uncaught errors in the pages');
    await shoot('sse-');
  } catch (err) {
    await shoot('failure-sse-');
    throw err;
  }
});

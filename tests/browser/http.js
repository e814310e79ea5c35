#!/usr/bin/env node
// ternmq's push endpoints in headless Chromium (driven by playwright-core), with
// mosquitto_pub publishing (tests/http.rs runs it):
//
//   node http.js <http-port> <tcp-port> <out-dir> <page-port> <app-port> <jwt-secret>
//
// - sse:  an EventSource page gets what mosquitto_pub sends; loaded again with its
//         client id it gets what came while it was away, and nothing twice; with the
//         broker's small max_unacked, EventSource's own reconnections (Last-Event-ID)
//         carry a longer run, each message once.
// - poll: the same with a long-polling page.
// - friend-circle: the example app (examples/friend-circle/server.js), alice by SSE in
//         one browser context and bob by MQTT over WebSocket (mqtt.js) in another: likes
//         and comments light the red dot; a closed page gets its notifications back.
// Screenshots go to <out-dir>/http-*.png. Every wait is bounded, a watchdog bounds the
// run, and only the processes started here are stopped (by their handles).
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

const WAIT_MS = 15000;
const WATCHDOG_MS = 150000;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage'];
const children = new Set();

function log(...args) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...args);
}

function withTimeout(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function run(cmd, args, env) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } });
  children.add(child);
  const proc = { child, stdout: '', stderr: '' };
  child.stdout.on('data', (d) => { proc.stdout += d; });
  child.stderr.on('data', (d) => { proc.stderr += d; });
  proc.done = new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => { children.delete(child); resolve({ code, stdout: proc.stdout, stderr: proc.stderr }); });
  });
  return proc;
}

async function waitFor(predicate, what) {
  const deadline = Date.now() + WAIT_MS;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${WAIT_MS} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function serve(port) {
  const server = http.createServer((req, res) => {
    if (new URL(req.url, 'http://x').pathname !== '/push.html') { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    fs.createReadStream(path.join(__dirname, 'push.html')).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

async function mosquittoPub(tcpPort, topic, message) {
  const r = await withTimeout(run('mosquitto_pub', ['-h', '127.0.0.1', '-p', tcpPort, '-q', '1', '-t', topic, '-m', message]).done, 'mosquitto_pub');
  if (r.code !== 0) throw new Error(`mosquitto_pub failed (${r.code}): ${r.stderr}`);
}

async function shot(page, outDir, name) {
  const file = path.join(outDir, `http-${name}.png`);
  await page.screenshot({ path: file, fullPage: true, timeout: WAIT_MS })
    .then(() => log(`screenshot ${file}`), (e) => log(`no screenshot ${name}: ${e.message}`));
}

// The page receives `expected` (in order) and nothing else.
async function expectReceived(page, expected, what) {
  await page.waitForFunction((n) => window.received().length >= n, expected.length, { timeout: WAIT_MS })
    .catch(async () => { throw new Error(`${what}: have ${JSON.stringify(await page.evaluate(() => window.received()))}`); });
  const got = await page.evaluate(() => window.received());
  if (JSON.stringify(got) !== JSON.stringify(expected)) {
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(got)}`);
  }
  log(`${what}: ${JSON.stringify(got)}`);
}

async function pushCase(context, mode, env) {
  const page = await context.newPage();
  page.on('pageerror', (e) => log(`  page error (${mode}): ${e.message}`));
  const url = `http://127.0.0.1:${env.pagePort}/push.html`;
  const topic = `push-test/${mode}`;
  const clientId = `${mode}-page`;
  const start = () => withTimeout(page.evaluate(([b, t, c, m]) => window.start(b, t, c, m),
    [env.broker, `${topic}/#`, clientId, mode]), `${mode} page starts`);
  try {
    await page.goto(url, { timeout: WAIT_MS });
    await start();
    await mosquittoPub(env.tcpPort, `${topic}/a`, 'one');
    await expectReceived(page, [`${topic}/a: one`], `${mode}: live`);

    // Away (the stream or poll ends with the page), a message, then back.
    await page.goto('about:blank');
    await mosquittoPub(env.tcpPort, `${topic}/a`, 'two');
    await page.goto(url, { timeout: WAIT_MS });
    await start();
    await mosquittoPub(env.tcpPort, `${topic}/a`, 'three');
    await expectReceived(page, [`${topic}/a: two`, `${topic}/a: three`], `${mode}: back, without duplicates`);

    // A run longer than the broker's max_unacked (2): SSE streams end and EventSource
    // reconnects by itself with Last-Event-ID; polls acknowledge with ack=.
    const more = ['4', '5', '6', '7', '8'];
    for (const m of more) await mosquittoPub(env.tcpPort, `${topic}/b`, m);
    await expectReceived(page, [`${topic}/a: two`, `${topic}/a: three`, ...more.map((m) => `${topic}/b: ${m}`)],
      `${mode}: a longer run, each once`);
  } finally {
    await shot(page, env.outDir, mode);
    await page.evaluate(() => window.stop()).catch(() => {});
    await page.close().catch(() => {});
  }
}

async function appPage(browser, env, user, via) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (e) => log(`  page error (${user}): ${e.message}`));
  page.on('console', (m) => log(`  page console (${user}): ${m.text()}`));
  await page.goto(`${env.app}/?via=${via}`, { timeout: WAIT_MS });
  await page.fill('#user', user);
  await page.fill('#password', user);
  await page.click('#login button');
  await page.waitForFunction(() => document.body.dataset.state === 'connected', null, { timeout: WAIT_MS });
  log(`friend-circle: ${user} connected by ${via}`);
  return { context, page };
}

const notifications = (page) => page.evaluate(() => [...document.querySelectorAll('.notification')].map((li) => li.textContent));

async function expectNotifications(page, expected, what) {
  await page.waitForFunction((n) => document.querySelectorAll('.notification').length >= n, expected.length, { timeout: WAIT_MS })
    .catch(async () => { throw new Error(`${what}: have ${JSON.stringify(await notifications(page))}`); });
  const got = await notifications(page);
  if (JSON.stringify(got) !== JSON.stringify(expected)) throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(got)}`);
  const dot = await page.evaluate(() => document.getElementById('bell').classList.contains('unread'));
  if (!dot) throw new Error(`${what}: no red dot`);
  log(`${what}: ${JSON.stringify(got)}, red dot on`);
}

async function friendCircle(browser, env) {
  const app = run('node', [path.join(__dirname, '../../examples/friend-circle/server.js')],
    { APP_PORT: String(env.appPort), BROKER: env.broker, JWT_SECRET: env.secret });
  await waitFor(() => app.stdout.includes('friend-circle on'), 'the app server starts');
  let alice;
  let bob;
  try {
    alice = await appPage(browser, env, 'alice', 'sse');
    bob = await appPage(browser, env, 'bob', 'mqtt');
    await bob.page.click('.post[data-post="1"] .like');
    await expectNotifications(alice.page, ['bob liked your post "Sunrise over the harbour this morning."'], 'alice (SSE) sees bob\'s like');
    await shot(alice.page, env.outDir, 'friend-circle-alice-sse');

    await alice.page.fill('.post[data-post="2"] .comment', 'Congratulations!');
    await alice.page.click('.post[data-post="2"] .send');
    await expectNotifications(bob.page, ['alice commented "Congratulations!" on your post "Finished my first marathon!"'], 'bob (mqtt.js) sees alice\'s comment');
    await shot(bob.page, env.outDir, 'friend-circle-bob-mqtt');

    // Both pages closed; notifications come meanwhile; each page, back, gets its own.
    await alice.page.goto('about:blank');
    await bob.page.goto('about:blank');
    await bob.page.waitForTimeout(200); // bob's MQTT connection closes with its page
    const post = (who, id, what, body) => fetchAs(env, who, `/api/posts/${id}/${what}`, body);
    await post(bob, 1, 'comment', { text: 'See you there' });
    await post(alice, 2, 'like', {});
    await alice.page.goto(`${env.app}/?via=sse`);
    await expectNotifications(alice.page, ['bob commented "See you there" on your post "Sunrise over the harbour this morning."'],
      'alice, back, gets what came while away (and not the like again)');
    await shot(alice.page, env.outDir, 'friend-circle-alice-back');
    await bob.page.goto(`${env.app}/?via=mqtt`);
    await expectNotifications(bob.page, ['alice liked your post "Finished my first marathon!"'], 'bob, back, gets his');
    await shot(bob.page, env.outDir, 'friend-circle-bob-back');
  } finally {
    for (const p of [alice, bob]) if (p) await p.context.close().catch(() => {});
    app.child.kill('SIGTERM');
  }
}

// A request to the app server with a user's session cookie (the page's context has it).
async function fetchAs(env, who, path, body) {
  const cookies = await who.context.cookies(env.app);
  const cookie = cookies.map((c) => `${c.name}=${c.value}`).join('; ');
  const res = await fetch(`${env.app}${path}`, { method: 'POST', headers: { cookie }, body: JSON.stringify(body) });
  if (!res.ok) throw new Error(`${path}: ${res.status} ${await res.text()}`);
}

async function test(env) {
  const { chromium } = require('playwright-core');
  fs.mkdirSync(env.outDir, { recursive: true });
  const server = await serve(env.pagePort);
  let browser;
  const results = [];
  try {
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 30000 });
    const context = await browser.newContext();
    const cases = [['sse', () => pushCase(context, 'sse', env)], ['poll', () => pushCase(context, 'poll', env)],
      ['friend-circle', () => friendCircle(browser, env)]];
    for (const [name, f] of cases) {
      try {
        await f();
        results.push([name, 'ok']);
      } catch (e) {
        log(`${name}: FAILED: ${e.stack || e}`);
        results.push([name, 'FAILED']);
      }
    }
  } finally {
    if (browser) await withTimeout(browser.close(), 'Chromium closes').catch((e) => log(e.message));
    server.close();
  }
  for (const [name, result] of results) log(`${name}: ${result}`);
  const failed = results.filter(([, r]) => r !== 'ok').length;
  console.log(`${results.length - failed} passed, ${failed} failed`);
  return failed === 0 && results.length === 3;
}

async function main() {
  const a = process.argv.slice(2);
  if (a.length !== 6) {
    console.error('usage: node http.js <http-port> <tcp-port> <out-dir> <page-port> <app-port> <jwt-secret>');
    process.exit(2);
  }
  const env = { broker: `http://127.0.0.1:${a[0]}`, tcpPort: a[1], outDir: a[2], pagePort: Number(a[3]),
    appPort: Number(a[4]), app: `http://127.0.0.1:${a[4]}`, secret: a[5] };
  const watchdog = setTimeout(() => {
    log(`watchdog: still running after ${WATCHDOG_MS} ms; stopping`);
    for (const child of children) child.kill('SIGKILL');
    process.exit(1);
  }, WATCHDOG_MS);
  let ok = false;
  try {
    ok = await test(env);
  } catch (e) {
    log(`FAILED: ${e.stack || e}`);
  }
  clearTimeout(watchdog);
  for (const child of children) child.kill('SIGKILL');
  process.exit(ok ? 0 : 1);
}

main();

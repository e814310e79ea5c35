#!/usr/bin/env node
// ternmq's browser test: mqtt.js's browser bundle in headless Chromium (driven by
// playwright-core) talks to mosquitto_pub and mosquitto_sub through ternmq.
//
//   node run.js <ws-port> <tcp-port> <out-dir>   # the test (tests/websocket.rs runs it)
//   node run.js --serve [port]                    # only serve the page, for a person
//
// For each case (MQTT 3.1.1 and 5.0, `ws://127.0.0.1:<port>/mqtt` and the same without a
// path): a message from mosquitto_pub must appear in the page's DOM, and a message
// published by the page must reach mosquitto_sub. With TERNMQ_WSS_PORT, TERNMQ_WSS_TOKEN
// and TERNMQ_WSS_SPKI in the environment, one case more: MQTT 5.0 over
// `wss://localhost:<port>/mqtt` with the JWT as password (username `web`), Chromium
// trusting the server's key by its SPKI hash (base64 SHA-256), nothing else. One screenshot per case goes to
// <out-dir>/<case>.png. Every wait is bounded, a watchdog bounds the whole run, and only
// the processes started here are stopped (by their handles).
'use strict';

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const WAIT_MS = 15000;
const WATCHDOG_MS = 120000;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// Chromium flags for a sandbox without a display, a GPU or outside network.
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage'];

const children = new Set();

function log(...args) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...args);
}

// Serves the test page and mqtt.js's browser bundle on 127.0.0.1.
function serve(port = 0) {
  const files = {
    '/': [path.join(__dirname, 'index.html'), 'text/html; charset=utf-8'],
    '/mqtt.min.js': [require.resolve('mqtt/dist/mqtt.min'), 'text/javascript; charset=utf-8'],
  };
  const server = http.createServer((req, res) => {
    const file = files[new URL(req.url, 'http://x').pathname];
    if (req.url === '/favicon.ico') {
      res.writeHead(204).end();
      return;
    }
    if (!file) {
      res.writeHead(404).end('not found\n');
      return;
    }
    res.writeHead(200, { 'content-type': file[1] });
    fs.createReadStream(file[0]).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve(server));
  });
}

function withTimeout(promise, what, ms = WAIT_MS) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// Starts a command; `done` resolves with its exit code and output.
function run(cmd, args) {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  const proc = { child, stdout: '', stderr: '' };
  child.stdout.on('data', (d) => { proc.stdout += d; });
  child.stderr.on('data', (d) => { proc.stderr += d; });
  proc.done = new Promise((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code, signal) => {
      children.delete(child);
      resolve({ code, signal, stdout: proc.stdout, stderr: proc.stderr });
    });
  });
  return proc;
}

async function waitFor(predicate, what) {
  const deadline = Date.now() + WAIT_MS;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${WAIT_MS} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function runCase(context, pageUrl, c, tcpPort, outDir) {
  const page = await context.newPage();
  page.on('console', (m) => log(`  page console (${c.name}): ${m.text()}`));
  page.on('pageerror', (e) => log(`  page error (${c.name}): ${e.message}`));
  try {
    await page.goto(pageUrl, { timeout: WAIT_MS });
    const clientId = `browser-${c.name}`;
    const inTopic = `ternmq-test/${c.name}/to-browser`;
    const outTopic = `ternmq-test/${c.name}/from-browser`;
    log(`${c.name}: connecting to ${c.url} with MQTT ${c.version === 5 ? '5.0' : '3.1.1'}`);
    await withTimeout(page.evaluate(
      ([url, version, id, topic, auth]) => window.start(url, version, id, topic, auth),
      [c.url, c.version, clientId, inTopic, c.auth]), 'page connects and subscribes');

    // mosquitto_pub -> ternmq (tcp) -> page (ws)
    const inText = `hello browser, ${c.name}, from mosquitto_pub`;
    const pub = await withTimeout(run('mosquitto_pub',
      ['-h', '127.0.0.1', '-p', tcpPort, '-q', '1', '-t', inTopic, '-m', inText]).done, 'mosquitto_pub');
    if (pub.code !== 0) throw new Error(`mosquitto_pub failed (${pub.code}): ${pub.stderr}`);
    const expected = `${inTopic}: ${inText}`;
    await page.waitForFunction((t) => document.getElementById('messages').textContent.includes(t),
      expected, { timeout: WAIT_MS });
    const dom = await page.textContent('#messages');
    if (!dom.includes(expected)) throw new Error(`DOM lacks "${expected}": ${dom}`);
    log(`${c.name}: the page shows "${expected}"`);

    // page (ws) -> ternmq (tcp) -> mosquitto_sub. Its debug output says when its
    // subscription is in place; -C 1 -W 15 bound it.
    const outText = `hello mosquitto_sub, ${c.name}, from the browser`;
    const sub = run('stdbuf', ['-oL', 'mosquitto_sub', '-h', '127.0.0.1', '-p', tcpPort, '-d', '-v',
      '-q', '1', '-C', '1', '-W', String(WAIT_MS / 1000), '-t', outTopic]);
    await waitFor(() => sub.stdout.includes('SUBACK'), 'mosquitto_sub subscribes');
    await withTimeout(page.evaluate(([t, m]) => window.send(t, m), [outTopic, outText]),
      'the page publishes (PUBACK)');
    const got = await withTimeout(sub.done, 'mosquitto_sub receives and exits');
    const line = `${outTopic} ${outText}`;
    if (got.code !== 0 || !got.stdout.split('\n').includes(line)) {
      throw new Error(`mosquitto_sub (exit ${got.code}) did not print "${line}":\n${got.stdout}${got.stderr}`);
    }
    log(`${c.name}: mosquitto_sub printed "${line}"`);
  } finally {
    // Whatever happened, show it.
    const shot = path.join(outDir, `${c.name}.png`);
    await page.screenshot({ path: shot, fullPage: true, timeout: WAIT_MS })
      .then(() => log(`${c.name}: screenshot ${shot}`), (e) => log(`${c.name}: no screenshot: ${e.message}`));
    await withTimeout(page.evaluate(() => window.stop()), 'page disconnects').catch(() => {});
    await page.close().catch(() => {});
  }
}

async function test(wsPort, tcpPort, outDir) {
  const { chromium } = require('playwright-core');
  fs.mkdirSync(outDir, { recursive: true });
  const server = await serve();
  const pageUrl = `http://127.0.0.1:${server.address().port}/`;
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'ternmq-chromium-'));
  let context;
  const results = [];
  const cases = [];
  for (const [version, v] of [[4, 'v3.1.1'], [5, 'v5']]) {
    cases.push({ name: `${v}-path`, version, url: `ws://127.0.0.1:${wsPort}/mqtt` });
    cases.push({ name: `${v}-root`, version, url: `ws://127.0.0.1:${wsPort}` });
  }
  const args = [...CHROMIUM_ARGS];
  const { TERNMQ_WSS_PORT: wssPort, TERNMQ_WSS_TOKEN: token, TERNMQ_WSS_SPKI: spki } = process.env;
  if (wssPort && token && spki) {
    args.push(`--ignore-certificate-errors-spki-list=${spki}`);
    cases.push({ name: 'v5-wss-jwt', version: 5, url: `wss://localhost:${wssPort}/mqtt`,
                 auth: { username: 'web', password: token } });
  }
  try {
    log(`launching ${CHROMIUM}; page at ${pageUrl}`);
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM, headless: true, args, timeout: 30000,
    });
    for (const c of cases) {
      try {
        await runCase(context, pageUrl, c, String(tcpPort), outDir);
        results.push([c.name, 'ok']);
      } catch (e) {
        log(`${c.name}: FAILED: ${e.stack || e}`);
        results.push([c.name, 'FAILED']);
      }
    }
  } finally {
    if (context) await withTimeout(context.close(), 'Chromium closes').catch((e) => log(e.message));
    server.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  for (const [name, result] of results) log(`${name}: ${result}`);
  const failed = results.filter(([, r]) => r !== 'ok').length;
  console.log(`${results.length - failed} passed, ${failed} failed`);
  return failed === 0 && results.length === cases.length;
}

async function main() {
  const args = process.argv.slice(2);
  if (args[0] === '--serve') {
    const server = await serve(Number(args[1] || 8080));
    console.log(`open http://127.0.0.1:${server.address().port}/ (ternmq's ws listener on 8083); Ctrl-C stops`);
    return;
  }
  if (args.length !== 3) {
    console.error('usage: node run.js <ws-port> <tcp-port> <out-dir> | node run.js --serve [port]');
    process.exit(2);
  }
  const watchdog = setTimeout(() => {
    log(`watchdog: still running after ${WATCHDOG_MS} ms; stopping`);
    for (const child of children) child.kill('SIGKILL');
    process.exit(1); // playwright-core closes the browser it launched on exit
  }, WATCHDOG_MS);
  let ok = false;
  try {
    ok = await test(args[0], args[1], args[2]);
  } catch (e) {
    log(`FAILED: ${e.stack || e}`);
  }
  clearTimeout(watchdog);
  for (const child of children) child.kill('SIGKILL');
  process.exit(ok ? 0 : 1);
}

main();

#!/usr/bin/env node
// ternmq's web console in headless Chromium (driven by playwright-core).
//
//   node admin-console.js <admin-port> <token> <out-dir>   # tests/observe.rs runs it
//
// The broker it is pointed at has a client "console-victim" connected, a retained
// message console/retained = 42, a ws listener, and messages flowing (tests/observe.rs).
// Checked here: the page loads and goes live; the message-rate chart moves; the victim
// is in the client table, and goes when its Disconnect button is clicked; the topic
// browser shows the retained value; the page's MQTT client appears in the table when it
// connects (and the clients chart moves), subscribes, publishes and
// receives its own message. Screenshots go to <out-dir>. Every wait is bounded, and a
// watchdog bounds the whole run.
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const WAIT_MS = 15000;
const WATCHDOG_MS = 90000;
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--disable-dev-shm-usage'];

function log(...args) {
  console.log(`[${new Date().toISOString().slice(11, 23)}]`, ...args);
}

async function test(port, token, outDir) {
  const { chromium } = require('playwright-core');
  fs.mkdirSync(outDir, { recursive: true });
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'ternmq-console-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 30000,
      viewport: { width: 1200, height: 900 },
    });
    const page = await context.newPage();
    page.on('console', (m) => log(`page console: ${m.text()}`));
    page.on('pageerror', (e) => log(`page error: ${e.message}`));
    page.on('dialog', (d) => d.accept());
    try {
      await page.goto(`http://127.0.0.1:${port}/#token=${encodeURIComponent(token)}`, { timeout: WAIT_MS });
      await page.waitForFunction(() => document.getElementById('status').textContent === 'live',
        null, { timeout: WAIT_MS });
      log('the console is live');

      // The chart moves: the polyline of messages in changes from one second to the next,
      // with a rate above 0.
      const points = () => page.$eval('#chart-rate polyline.in', (p) => p.getAttribute('points'));
      await page.waitForFunction(() => {
        const p = document.querySelector('#chart-rate polyline.in');
        return p && p.getAttribute('points').split(' ').length >= 3;
      }, null, { timeout: WAIT_MS });
      const before = await points();
      await page.waitForFunction((b) => document.querySelector('#chart-rate polyline.in').getAttribute('points') !== b,
        before, { timeout: WAIT_MS });
      const rate = await page.textContent('#card-rate-in');
      if (!(parseFloat(rate) > 0)) throw new Error(`messages in /s shows ${rate}`);
      log(`the rate chart moves; ${rate} messages in per second`);

      // The victim is listed, with its details; Disconnect removes it.
      const victim = 'tr[data-client-id="console-victim"]';
      await page.waitForSelector(victim, { timeout: WAIT_MS });
      const row = await page.textContent(victim);
      if (!row.includes('5.0') || !row.includes('127.0.0.1:')) throw new Error(`victim row: ${row}`);
      log(`the client table lists console-victim: ${row}`);
      await page.fill('#client-search', 'victim');
      await page.waitForFunction(() => document.querySelectorAll('#clients tbody tr').length === 1,
        null, { timeout: WAIT_MS });
      await page.screenshot({ path: path.join(outDir, 'clients-search.png'), fullPage: true });
      await page.click(`${victim} button`);
      await page.waitForSelector(victim, { state: 'detached', timeout: WAIT_MS });
      log('console-victim is gone from the table after Disconnect');
      await page.fill('#client-search', '');

      // The topic browser.
      await page.waitForFunction(() => {
        const r = document.querySelector('#retained tr[data-topic="console/retained"]');
        return r && r.textContent.includes('42');
      }, null, { timeout: WAIT_MS });
      log('the topic browser shows console/retained = 42');

      // The page's MQTT client, over the broker's ws listener.
      await page.waitForFunction(() => document.getElementById('mqtt-url').value.startsWith('ws://'),
        null, { timeout: WAIT_MS });
      const clientsChart = () => page.$eval('#chart-clients polyline', (p) => p.getAttribute('points'));
      const clientsBefore = await clientsChart();
      await page.click('#mqtt-connect-button');
      await page.waitForFunction(() => document.getElementById('mqtt-state').textContent === 'connected',
        null, { timeout: WAIT_MS });
      // A client that connects while the page is open appears in the table (its id is
      // `console-<random>`), and the connection-count chart moves with it.
      await page.waitForSelector('tr[data-client-id^="console-"]:not([data-client-id="console-victim"])',
        { timeout: WAIT_MS });
      await page.waitForFunction((b) => document.querySelector('#chart-clients polyline').getAttribute('points') !== b,
        clientsBefore, { timeout: WAIT_MS });
      log(`the page's own MQTT client appears in the table; the clients chart moved (${await clientsChart()})`);
      await page.fill('#mqtt-filter', 'console/#');
      await page.click('#mqtt-subscribe button');
      await page.waitForFunction(() => document.getElementById('mqtt-log').textContent.includes('subscribed to console/#'),
        null, { timeout: WAIT_MS });
      await page.fill('#mqtt-topic', 'console/echo');
      await page.fill('#mqtt-payload', 'hello from the console');
      await page.click('#mqtt-publish button');
      await page.waitForFunction(() => document.getElementById('mqtt-log').textContent.includes('console/echo: hello from the console'),
        null, { timeout: WAIT_MS });
      const shown = await page.textContent('#mqtt-log');
      if (!shown.includes('console/retained (retained): 42')) throw new Error(`log: ${shown}`);
      log('the page published and received over MQTT');
      // Let a few more seconds of chart accumulate for the picture.
      await page.waitForTimeout(2500);
      return true;
    } finally {
      await page.screenshot({ path: path.join(outDir, 'console.png'), fullPage: true, timeout: WAIT_MS })
        .then(() => log(`screenshot ${path.join(outDir, 'console.png')}`), (e) => log(`no screenshot: ${e.message}`));
    }
  } finally {
    if (context) await context.close().catch((e) => log(e.message));
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

async function main() {
  const args = process.argv.slice(2);
  if (args.length !== 3) {
    console.error('usage: node admin-console.js <admin-port> <token> <out-dir>');
    process.exit(2);
  }
  const watchdog = setTimeout(() => {
    log(`watchdog: still running after ${WATCHDOG_MS} ms; stopping`);
    process.exit(1);
  }, WATCHDOG_MS);
  let ok = false;
  try {
    ok = await test(args[0], args[1], args[2]);
  } catch (e) {
    log(`FAILED: ${e.stack || e}`);
  }
  clearTimeout(watchdog);
  console.log(ok ? '1 passed, 0 failed' : '0 passed, 1 failed');
  process.exit(ok ? 0 : 1);
}

main();

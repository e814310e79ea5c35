// ternmq's web console: polls the admin API (every second for the cards and charts),
// lists clients and retained topics, and carries a small MQTT client for trying things.
// No framework and no build step; the token stays in this tab's sessionStorage.
'use strict';

const $ = (id) => document.getElementById(id);
const WINDOW = 60; // seconds shown in the charts

// ---- the admin API ----

function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem('ternmq-token', decodeURIComponent(m[1]));
    history.replaceState(null, '', location.pathname); // the token leaves the address bar
  }
  return sessionStorage.getItem('ternmq-token') || '';
}

async function api(path, options = {}) {
  const res = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token()}`, 'Content-Type': 'application/json' },
  });
  if (res.status === 401) {
    $('login').hidden = false;
    throw new Error('the admin token is missing or wrong');
  }
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

$('login').addEventListener('submit', (e) => {
  e.preventDefault();
  sessionStorage.setItem('ternmq-token', $('token').value.trim());
  $('login').hidden = true;
  refreshAll();
});

// ---- numbers ----

function count(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)} k`;
  return String(Math.round(n));
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

// ---- cards and charts ----

const series = { in: [], out: [], clients: [] };
let previous = null;

function push(list, value) {
  list.push(value);
  if (list.length > WINDOW) list.shift();
}

// Draws each series of `lines` ([class, values]) as a polyline scaled to the largest value.
function chart(svg, lines) {
  const w = 600, h = 160, top = 14;
  const max = Math.max(1, ...lines.flatMap(([, v]) => v));
  const x = (i) => (w * i) / (WINDOW - 1);
  const y = (v) => h - 2 - ((h - top - 4) * v) / max;
  let out = `<line class="grid" x1="0" x2="${w}" y1="${y(max)}" y2="${y(max)}"/>`
    + `<line class="grid" x1="0" x2="${w}" y1="${y(max / 2)}" y2="${y(max / 2)}"/>`
    + `<text class="axis" x="4" y="${top - 3}">${count(max)}</text>`;
  for (const [cls, values] of lines) {
    const offset = WINDOW - values.length;
    const points = values.map((v, i) => `${x(offset + i).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
    out += `<polyline class="${cls}" points="${points}"/>`;
  }
  svg.innerHTML = out;
}

async function refreshSummary() {
  const s = await api('/api/v1/summary');
  const now = performance.now() / 1000;
  if (previous) {
    const dt = Math.max(now - previous.at, 0.001);
    push(series.in, Math.max(0, (s.messages.received - previous.received) / dt));
    push(series.out, Math.max(0, (s.messages.sent - previous.sent) / dt));
  }
  previous = { at: now, received: s.messages.received, sent: s.messages.sent };
  push(series.clients, s.clients_connected);
  $('version').textContent = `v${s.version}`;
  $('uptime').textContent = `up ${duration(s.uptime_seconds)}`;
  $('card-clients').textContent = count(s.clients_connected);
  $('card-rate-in').textContent = series.in.length ? count(series.in.at(-1)) : '–';
  $('card-rate-out').textContent = series.out.length ? count(series.out.at(-1)) : '–';
  $('card-sessions').textContent = `${count(s.sessions.total)} (${count(s.sessions.offline)})`;
  $('card-subscriptions').textContent = count(s.subscriptions);
  $('card-retained').textContent = count(s.retained.count);
  $('card-dropped').textContent = count(s.messages.dropped);
  $('card-memory').textContent = `${bytes(s.memory.queued.used)}`;
  $('card-rss').textContent = s.process ? bytes(s.process.rss_bytes) : '–';
  chart($('chart-rate'), [['in', series.in], ['out', series.out]]);
  chart($('chart-clients'), [['in', series.clients]]);
  defaultWebSocketUrl(s.listeners);
  status('live');
}

// ---- clients ----

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text ?? '';
  if (cls) td.className = cls;
  return td;
}

async function refreshClients() {
  const search = encodeURIComponent($('client-search').value.trim());
  const list = await api(`/api/v1/clients?limit=200&search=${search}`);
  const body = $('clients').tBodies[0];
  body.replaceChildren();
  for (const c of list.clients) {
    const row = body.insertRow();
    row.dataset.clientId = c.client_id;
    cell(row, c.client_id);
    cell(row, c.connected ? c.address : 'offline', c.connected ? '' : 'muted');
    cell(row, c.protocol);
    cell(row, c.connected ? `${c.keep_alive} s` : '');
    cell(row, c.connected_since ? new Date(c.connected_since * 1000).toLocaleString() : '');
    cell(row, c.queued);
    cell(row, c.inflight);
    cell(row, c.subscription_count);
    const actions = cell(row, '');
    if (c.connected) {
      const b = document.createElement('button');
      b.textContent = 'Disconnect';
      b.className = 'danger';
      b.addEventListener('click', () => disconnect(c.client_id));
      actions.append(b);
    }
  }
  $('client-count').textContent = `${list.total} client${list.total === 1 ? '' : 's'}`;
}

async function disconnect(id) {
  if (!confirm(`Disconnect ${id}? Its session stays as its expiry says.`)) return;
  try {
    await api(`/api/v1/clients/${encodeURIComponent(id)}`, { method: 'DELETE' });
  } catch (e) {
    status(e.message, true);
  }
  setTimeout(refreshClients, 200);
}

let searchTimer;
$('client-search').addEventListener('input', () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => refreshClients().catch((e) => status(e.message, true)), 250);
});

// ---- retained topics ----

let retainedNext = null;

async function showRetained(more = false) {
  const filter = encodeURIComponent($('retained-filter').value.trim() || '#');
  const after = more && retainedNext ? `&after=${encodeURIComponent(retainedNext)}` : '';
  const page = await api(`/api/v1/retained?limit=100&filter=${filter}${after}`);
  const body = $('retained').tBodies[0];
  if (!more) body.replaceChildren();
  for (const m of page.messages) {
    const row = body.insertRow();
    row.dataset.topic = m.topic;
    cell(row, m.topic);
    const value = m.encoding === 'utf8' ? m.payload : `base64: ${m.payload}`;
    cell(row, value + (m.truncated ? ' …' : ''), 'payload');
    cell(row, m.size);
    cell(row, m.qos);
    const b = document.createElement('button');
    b.textContent = 'Delete';
    b.className = 'danger';
    b.addEventListener('click', async () => {
      if (!confirm(`Delete the retained message of ${m.topic}?`)) return;
      await api(`/api/v1/retained?topic=${encodeURIComponent(m.topic)}`, { method: 'DELETE' });
      row.remove();
    });
    row.insertCell().append(b);
  }
  retainedNext = page.next;
  $('retained-more').hidden = !page.next;
}

$('retained-form').addEventListener('submit', (e) => {
  e.preventDefault();
  showRetained().catch((err) => status(err.message, true));
});
$('retained-more').addEventListener('click', () => showRetained(true).catch((e) => status(e.message, true)));

// ---- a small MQTT 3.1.1 client over WebSocket (QoS 0) ----

const utf8 = new TextEncoder();
const text = new TextDecoder();

function mqttString(s) {
  const b = utf8.encode(s);
  return [b.length >> 8, b.length & 255, ...b];
}

function mqttPacket(first, body) {
  const len = [];
  let n = body.length;
  do {
    let digit = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) digit |= 128;
    len.push(digit);
  } while (n > 0);
  return new Uint8Array([first, ...len, ...body]);
}

class MiniMqtt {
  constructor(url, { username, password, onMessage, onClose }) {
    this.url = url;
    this.username = username;
    this.password = password;
    this.onMessage = onMessage;
    this.onClose = onClose;
    this.buffer = new Uint8Array(0);
    this.nextId = 1;
    this.waiting = new Map();
  }

  connect() {
    return new Promise((resolve, reject) => {
      this.connected = { resolve, reject };
      const ws = new WebSocket(this.url, ['mqtt']);
      this.ws = ws;
      ws.binaryType = 'arraybuffer';
      ws.onopen = () => {
        let flags = 0x02; // clean session
        const payload = [...mqttString(`console-${Math.random().toString(16).slice(2, 10)}`)];
        if (this.username) { flags |= 0x80; payload.push(...mqttString(this.username)); }
        if (this.password) { flags |= 0x40; payload.push(...mqttString(this.password)); }
        ws.send(mqttPacket(0x10, [...mqttString('MQTT'), 4, flags, 0, 60, ...payload]));
        this.ping = setInterval(() => ws.send(new Uint8Array([0xc0, 0])), 30000);
      };
      ws.onmessage = (e) => this.receive(new Uint8Array(e.data));
      ws.onclose = () => {
        clearInterval(this.ping);
        this.connected?.reject(new Error('connection closed'));
        this.onClose();
      };
    });
  }

  // Splits whole packets off the buffer: a WebSocket message may carry part of one, or several.
  receive(bytes) {
    const all = new Uint8Array(this.buffer.length + bytes.length);
    all.set(this.buffer);
    all.set(bytes, this.buffer.length);
    let at = 0;
    for (;;) {
      let len = 0, mult = 1, i = at + 1;
      for (;;) {
        if (i >= all.length) { this.buffer = all.slice(at); return; }
        const d = all[i++];
        len += (d & 127) * mult;
        mult *= 128;
        if (!(d & 128)) break;
      }
      if (i + len > all.length) { this.buffer = all.slice(at); return; }
      this.handle(all[at], all.subarray(i, i + len));
      at = i + len;
    }
  }

  handle(first, body) {
    switch (first >> 4) {
      case 2: // CONNACK
        if (body[1] === 0) this.connected.resolve();
        else this.connected.reject(new Error(`refused: CONNACK return code ${body[1]}`));
        this.connected = null;
        break;
      case 3: { // PUBLISH
        const n = (body[0] << 8) | body[1];
        const topic = text.decode(body.subarray(2, 2 + n));
        const qos = (first >> 1) & 3;
        const start = 2 + n + (qos ? 2 : 0);
        if (qos === 1) this.ws.send(new Uint8Array([0x40, 2, body[2 + n], body[3 + n]]));
        this.onMessage(topic, text.decode(body.subarray(start)), (first & 1) === 1);
        break;
      }
      case 9: { // SUBACK
        const id = (body[0] << 8) | body[1];
        const done = this.waiting.get(id);
        this.waiting.delete(id);
        if (done) (body[2] === 0x80 ? done.reject(new Error('subscription refused')) : done.resolve());
        break;
      }
      default:
    }
  }

  subscribe(filter) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.ws.send(mqttPacket(0x82, [id >> 8, id & 255, ...mqttString(filter), 0]));
    });
  }

  publish(topic, payload, retain) {
    this.ws.send(mqttPacket(0x30 | (retain ? 1 : 0), [...mqttString(topic), ...utf8.encode(payload)]));
  }

  close() {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(new Uint8Array([0xe0, 0]));
    this.ws.close();
  }
}

let mqtt = null;

function logLine(line) {
  const li = document.createElement('li');
  li.textContent = line;
  $('mqtt-log').prepend(li);
  while ($('mqtt-log').children.length > 200) $('mqtt-log').lastChild.remove();
}

function mqttState(s) { $('mqtt-state').textContent = s; }

// The first WebSocket listener, on the host this page came from.
function defaultWebSocketUrl(listeners) {
  if ($('mqtt-url').value) return;
  const ws = (listeners || []).find((l) => l.type === 'ws');
  if (!ws) { $('mqtt-url').placeholder = 'no ws listener configured'; return; }
  const port = ws.address.split(':').pop();
  $('mqtt-url').value = `${ws.tls ? 'wss' : 'ws'}://${location.hostname}:${port}${ws.path || '/mqtt'}`;
}

$('mqtt-connect').addEventListener('submit', async (e) => {
  e.preventDefault();
  if (mqtt) { mqtt.close(); return; }
  const client = new MiniMqtt($('mqtt-url').value.trim(), {
    username: $('mqtt-user').value,
    password: $('mqtt-password').value,
    onMessage: (topic, payload, retained) => logLine(`${topic}${retained ? ' (retained)' : ''}: ${payload}`),
    onClose: () => { mqtt = null; mqttState('not connected'); $('mqtt-connect-button').textContent = 'Connect'; },
  });
  mqttState('connecting…');
  try {
    await client.connect();
    mqtt = client;
    mqttState('connected');
    $('mqtt-connect-button').textContent = 'Disconnect';
  } catch (err) {
    mqttState(err.message);
  }
});

$('mqtt-subscribe').addEventListener('submit', async (e) => {
  e.preventDefault();
  if (!mqtt) { mqttState('connect first'); return; }
  const filter = $('mqtt-filter').value.trim();
  try {
    await mqtt.subscribe(filter);
    logLine(`subscribed to ${filter}`);
  } catch (err) {
    logLine(`${filter}: ${err.message}`);
  }
});

$('mqtt-publish').addEventListener('submit', (e) => {
  e.preventDefault();
  if (!mqtt) { mqttState('connect first'); return; }
  mqtt.publish($('mqtt-topic').value.trim(), $('mqtt-payload').value, $('mqtt-retain').checked);
});

// ---- the loop ----

async function refreshAll() {
  try {
    await refreshSummary();
    await refreshClients();
    if (!$('retained').tBodies[0].rows.length) await showRetained();
  } catch (e) {
    status(e.message, true);
  }
}

let tick = 0;
setInterval(async () => {
  tick += 1;
  try {
    await refreshSummary();
    if (tick % 2 === 0) await refreshClients();
  } catch (e) {
    status(e.message, true);
  }
}, 1000);
if (!token()) $('login').hidden = false;
refreshAll();

#!/usr/bin/env node
// friend-circle: the app server of ternmq's push example (README.md beside this file).
//
// It logs users in (a cookie), hands each browser a short-lived JWT that lets it read
// only its own topic `user/<name>/notify` (ACL claim `user/%u/notify`), serves a small
// social feed, and when someone likes or comments on a post it publishes a notification
// to the author's topic with ternmq's HTTP publish (POST /publish, QoS 1).
//
// No dependencies but Node (>= 20) itself; mqtt.js is served to the pages from
// node_modules (`npm ci` here, or tests/browser's).
//
//   APP_PORT=3000 BROKER=http://127.0.0.1:8080 JWT_SECRET=... node server.js
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

const APP_PORT = Number(process.env.APP_PORT || 3000);
const BROKER = process.env.BROKER || 'http://127.0.0.1:8080';
// The broker's [auth.jwt] secret: both sides sign and check tokens with it.
const SECRET = process.env.JWT_SECRET || 'friend-circle-demo-secret-change-me';
// Browser tokens live this long: the page asks for a new one when its stream needs it.
const TOKEN_SECONDS = Number(process.env.TOKEN_SECONDS || 600);

// Demo users: the password is the name.
const USERS = ['alice', 'bob', 'carol'];
const posts = [
  { id: 1, author: 'alice', text: 'Sunrise over the harbour this morning.', likes: [], comments: [] },
  { id: 2, author: 'bob', text: 'Finished my first marathon!', likes: [], comments: [] },
  { id: 3, author: 'carol', text: 'Anyone up for board games on Friday?', likes: [], comments: [] },
];

const b64url = (data) => Buffer.from(data).toString('base64url');

// An HS256 JWT, as ternmq's [auth.jwt] checks them.
function jwt(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify(claims));
  const sig = crypto.createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

// What a browser may do: read its own notifications, nothing else.
function userToken(user) {
  const exp = Math.floor(Date.now() / 1000) + TOKEN_SECONDS;
  return { token: jwt({ sub: user, exp, acl: { sub: ['user/%u/notify'] } }), exp };
}

// The app server's own token: publish notifications to anyone, read nothing.
function serviceToken() {
  const exp = Math.floor(Date.now() / 1000) + 60;
  return jwt({ sub: 'friend-circle-app', exp, acl: { pub: ['user/+/notify'] } });
}

// The session cookie: "<user>.<hmac>", so that the app knows who asks.
const sign = (user) => crypto.createHmac('sha256', SECRET).update(`cookie:${user}`).digest('base64url');
function whoIs(req) {
  const cookie = (req.headers.cookie || '').split(/;\s*/).find((c) => c.startsWith('fc_session='));
  if (!cookie) return null;
  const [user, mac] = cookie.slice('fc_session='.length).split('.');
  const ok = USERS.includes(user) && mac && crypto.timingSafeEqual(Buffer.from(mac), Buffer.from(sign(user)));
  return ok ? user : null;
}

async function notify(author, notification) {
  const res = await fetch(`${BROKER}/publish`, {
    method: 'POST',
    headers: { authorization: `Bearer ${serviceToken()}`, 'content-type': 'application/json' },
    body: JSON.stringify({ topic: `user/${author}/notify`, payload: JSON.stringify(notification), qos: 1 }),
  });
  if (!res.ok) throw new Error(`publish refused: ${res.status} ${await res.text()}`);
  console.log(`notified ${author}: ${notification.from} ${notification.type}d post ${notification.post}`);
}

function mqttBundle() {
  for (const base of [__dirname, path.join(__dirname, '../../tests/browser')]) {
    try {
      return require.resolve('mqtt/dist/mqtt.min', { paths: [base] });
    } catch (_) { /* next */ }
  }
  return null;
}

function send(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(typeof body === 'string' || Buffer.isBuffer(body) ? body : JSON.stringify(body));
}

async function readJson(req) {
  let data = '';
  for await (const chunk of req) {
    data += chunk;
    if (data.length > 10000) throw new Error('too large');
  }
  return data ? JSON.parse(data) : {};
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://app');
  const user = whoIs(req);
  if (req.method === 'GET' && url.pathname === '/') {
    return send(res, 200, fs.readFileSync(path.join(__dirname, 'public/index.html')), 'text/html; charset=utf-8');
  }
  if (req.method === 'GET' && url.pathname === '/mqtt.min.js') {
    const bundle = mqttBundle();
    if (!bundle) return send(res, 404, '// mqtt.js not installed: run npm ci in examples/friend-circle\n', 'text/javascript');
    return send(res, 200, fs.readFileSync(bundle), 'text/javascript; charset=utf-8');
  }
  if (req.method === 'POST' && url.pathname === '/api/login') {
    const { user: name, password } = await readJson(req);
    if (!USERS.includes(name) || password !== name) return send(res, 401, { error: 'unknown user or wrong password' });
    res.setHeader('set-cookie', `fc_session=${name}.${sign(name)}; Path=/; HttpOnly; SameSite=Strict`);
    return send(res, 200, { user: name });
  }
  if (!user) return send(res, 401, { error: 'log in first' });
  if (req.method === 'GET' && url.pathname === '/api/session') {
    // A fresh short-lived token for the page's stream or MQTT connection.
    return send(res, 200, { user, broker: BROKER, ...userToken(user) });
  }
  if (req.method === 'GET' && url.pathname === '/api/posts') return send(res, 200, posts);
  const m = url.pathname.match(/^\/api\/posts\/(\d+)\/(like|comment)$/);
  if (req.method === 'POST' && m) {
    const post = posts.find((p) => p.id === Number(m[1]));
    if (!post) return send(res, 404, { error: 'no such post' });
    const notification = { type: m[2], from: user, post: post.id, text: post.text, at: new Date().toISOString() };
    if (m[2] === 'like') {
      if (!post.likes.includes(user)) post.likes.push(user);
    } else {
      const { text } = await readJson(req);
      notification.comment = String(text || '').slice(0, 280);
      post.comments.push({ from: user, text: notification.comment });
    }
    if (post.author !== user) await notify(post.author, notification);
    return send(res, 200, post);
  }
  return send(res, 404, { error: 'not found' });
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((e) => {
    console.error(e);
    if (!res.headersSent) send(res, 500, { error: e.message });
  });
});
server.listen(APP_PORT, '127.0.0.1', () => {
  console.log(`friend-circle on http://127.0.0.1:${server.address().port}/ (broker ${BROKER}); users: ${USERS.join(', ')} (password = name)`);
});

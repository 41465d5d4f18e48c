// Berth dashboard: a client of the JSON API, in plain JavaScript (no build
// step, no dependencies). Rules kept throughout:
// - every piece of API data reaches the DOM as a text node or an attribute
//   value (`h`/`svg` below); nothing is ever parsed as HTML;
// - the org token lives in sessionStorage (this tab only), goes out as a
//   bearer header, and to the WebSocket as a subprotocol, never in a URL;
// - fields the API may or may not send yet (`progress`, `retry` messages)
//   are read defensively.
'use strict';

(() => {
  const TOKEN_KEY = 'berth.token';
  const IN_PROGRESS = new Set(['requested', 'provisioning', 'building', 'starting', 'stopping', 'deleting']);
  const ENDED = new Set(['running', 'failed', 'stopped', 'exited', 'deleted']);

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    instances: new Map(), // id -> instance view (plus `_retry` from the stream)
    ws: null,
    wsBackoff: 500,
    wsTimer: null,
    lastEventId: null,
    listLoading: false,
    touchedDuringLoad: new Set(),
    refreshTimers: new Map(),
    refreshSeq: new Map(),
    view: null, // { name, id?, refresh?: () => void }
  };

  // ---- DOM helpers: text only -------------------------------------------

  function append(el, kids) {
    for (const k of kids) {
      if (k === null || k === undefined || k === false) continue;
      if (Array.isArray(k)) append(el, k);
      else if (k instanceof Node) el.appendChild(k);
      else el.appendChild(document.createTextNode(String(k)));
    }
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (v === true) el.setAttribute(k, '');
      else el.setAttribute(k, String(v));
    }
  }

  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    return append(el, kids);
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...kids) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    return append(el, kids);
  }

  function replace(el, ...kids) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return append(el, kids);
  }

  const $ = (sel, root) => (root || document).querySelector(sel);
  const main = () => document.getElementById('main');

  function announce(text) {
    const el = document.getElementById('announce');
    el.textContent = '';
    // A change the screen reader notices even when the words repeat.
    setTimeout(() => { el.textContent = text; }, 30);
  }

  const str = (v) => (typeof v === 'string' ? v : v === null || v === undefined ? '' : String(v));

  // ---- time -------------------------------------------------------------

  // RFC 3339 with microseconds -> microseconds since the epoch (Date keeps
  // only milliseconds, and sim-runtime steps take less than one).
  function micros(s) {
    if (typeof s !== 'string') return NaN;
    const m = /^(.*T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(s);
    if (!m) return Date.parse(s) * 1000;
    const base = Date.parse(m[1] + m[3]);
    const frac = Number((m[2] || '').padEnd(6, '0').slice(0, 6));
    return base * 1000 + frac;
  }

  function fmtDur(us) {
    if (!Number.isFinite(us)) return '?';
    if (us < 1000) return `${Math.round(us)}µs`;
    if (us < 1e6) return `${(us / 1000).toFixed(us < 1e4 ? 2 : 1)}ms`;
    if (us < 6e7) return `${(us / 1e6).toFixed(2)}s`;
    return `${Math.floor(us / 6e7)}m${Math.round((us % 6e7) / 1e6)}s`;
  }

  function fmtTime(s) {
    const us = micros(s);
    if (!Number.isFinite(us)) return str(s);
    return new Date(us / 1000).toLocaleString();
  }

  // ---- API --------------------------------------------------------------

  async function api(method, path, body, token) {
    const headers = { Authorization: `Bearer ${token || state.token}` };
    const init = { method, headers, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (e) {
      return { status: 0, ok: false, json: null, text: '', error: { code: 'network', message: `cannot reach the server: ${e.message}` } };
    }
    const text = await resp.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
    const error = !resp.ok
      ? ((json && json.error) || { code: `http_${resp.status}`, message: text.slice(0, 300) || resp.statusText })
      : null;
    if (resp.status === 401 && !token) {
      // The token was revoked (or the server's database replaced).
      logout(error && error.message);
    }
    return { status: resp.status, ok: resp.ok, json, text, error };
  }

  const errText = (e) => (e ? `${str(e.message)}${e.code ? ` (${e.code})` : ''}` : '');

  // ---- session ----------------------------------------------------------

  function logout(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.instances.clear();
    state.lastEventId = null;
    if (state.ws) { state.ws.onclose = null; state.ws.close(); state.ws = null; }
    clearTimeout(state.wsTimer);
    document.getElementById('nav').hidden = true;
    document.getElementById('logout').hidden = true;
    document.getElementById('conn').hidden = true;
    renderLogin(message);
  }

  function renderLogin(message) {
    state.view = { name: 'login' };
    const err = h('p', { id: 'login-error', class: 'form-error', role: 'alert', hidden: !message }, message || '');
    const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false', 'aria-describedby': 'token-hint login-error' });
    const form = h('form', { id: 'login-form', class: 'panel login', novalidate: true },
      h('h1', null, 'Log in'),
      h('label', { for: 'token' }, 'Org token'),
      input,
      h('p', { id: 'token-hint', class: 'hint' }, 'An org token (berth_…). It is kept in this tab only, until you log out or close it.'),
      err,
      h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'login-submit' }, 'Log in')));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) { err.hidden = false; err.textContent = 'Enter an org token.'; input.focus(); return; }
      const r = await api('GET', '/v1/instances?limit=1', undefined, token);
      if (!r.ok) { err.hidden = false; err.textContent = errText(r.error); input.focus(); return; }
      sessionStorage.setItem(TOKEN_KEY, token);
      state.token = token;
      start();
    });
    replace(main(), form);
    input.focus();
  }

  function start() {
    document.getElementById('nav').hidden = false;
    document.getElementById('logout').hidden = false;
    document.getElementById('conn').hidden = false;
    connect();
    route();
  }

  // ---- event stream -----------------------------------------------------

  function setConn(text) {
    document.getElementById('conn').textContent = text;
  }

  function connect() {
    if (!state.token) return;
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let url = `${scheme}//${location.host}/v1/events`;
    if (state.lastEventId) url += `?after=${encodeURIComponent(state.lastEventId)}`;
    let ws;
    try {
      ws = new WebSocket(url, ['berth.v1', `berth.token.${state.token}`]);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    state.ws = ws;
    setConn('Connecting…');
    ws.onopen = () => {
      state.wsBackoff = 500;
      setConn('Live');
      // What changed while the stream was down (or before it opened).
      if (state.view && state.view.refresh) state.view.refresh();
    };
    ws.onmessage = (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (_) { return; }
      if (m && typeof m === 'object') onMessage(m);
    };
    ws.onclose = () => {
      state.ws = null;
      setConn('Reconnecting…');
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    clearTimeout(state.wsTimer);
    state.wsTimer = setTimeout(connect, state.wsBackoff);
    state.wsBackoff = Math.min(state.wsBackoff * 2, 10000);
  }

  function onMessage(m) {
    if (typeof m.id === 'string') state.lastEventId = m.id;
    const id = typeof m.instance_id === 'string' ? m.instance_id : null;
    if (!id) return;
    if (state.listLoading) state.touchedDuringLoad.add(id);
    const inst = state.instances.get(id);
    if (m.kind === 'status' && typeof m.status === 'string') {
      if (inst) {
        const was = inst.status;
        inst.status = m.status;
        if (ENDED.has(m.status)) { delete inst._retry; if (inst.progress) inst.progress = null; }
        if (m.error && typeof m.error === 'object') inst.error = m.error;
        if (was !== m.status) announce(`${inst.name} is now ${m.status}`);
        updated(inst);
      }
    } else if (m.kind === 'retry') {
      if (inst) {
        inst._retry = {
          step: m.step, attempt: m.attempt, max_attempts: m.max_attempts,
          last_error: m.error, next_attempt_at: m.next_attempt_at,
        };
        announce(`${inst.name}: ${str(m.step)} failed, retry ${str(m.attempt)}/${str(m.max_attempts)}`);
        updated(inst);
      }
    }
    if (state.view && state.view.name === 'dead' && m.kind === 'error') state.view.refresh();
    // The stream says what changed; the instance itself says everything
    // else (progress, IP, error, conditions), read once things settle.
    scheduleRefresh(id);
  }

  function scheduleRefresh(id) {
    clearTimeout(state.refreshTimers.get(id));
    state.refreshTimers.set(id, setTimeout(() => {
      state.refreshTimers.delete(id);
      refreshInstance(id);
    }, 120));
  }

  async function refreshInstance(id) {
    // Answers may come back out of order: only the latest read counts.
    const seq = (state.refreshSeq.get(id) || 0) + 1;
    state.refreshSeq.set(id, seq);
    const r = await api('GET', `/v1/instances/${encodeURIComponent(id)}`);
    if (state.refreshSeq.get(id) !== seq) return;
    if (r.ok && r.json) {
      const old = state.instances.get(id);
      const inst = r.json;
      // A retry seen on the stream stays until the instance has its own
      // progress or the step moved on.
      if (old && old._retry && !inst.progress && IN_PROGRESS.has(inst.status)) inst._retry = old._retry;
      state.instances.set(id, inst);
      updated(inst);
    } else if (r.status === 404) {
      const old = state.instances.get(id);
      if (old) { old.status = 'deleted'; updated(old); }
    }
  }

  // An instance changed: redraw what shows it.
  function updated(inst) {
    const v = state.view;
    if (!v) return;
    if (v.name === 'list') v.row(inst);
    if (v.name === 'instance' && v.id === inst.id) v.show(inst);
  }

  // ---- routing ----------------------------------------------------------

  function route() {
    if (!state.token) { renderLogin(); return; }
    const hash = location.hash || '#/';
    const m = /^#\/instances\/([^/]+)$/.exec(hash);
    document.getElementById('nav-instances').removeAttribute('aria-current');
    document.getElementById('nav-dead').removeAttribute('aria-current');
    if (m) {
      renderInstance(decodeURIComponent(m[1]));
    } else if (hash === '#/dead-letters') {
      document.getElementById('nav-dead').setAttribute('aria-current', 'page');
      renderDeadLetters();
    } else {
      document.getElementById('nav-instances').setAttribute('aria-current', 'page');
      renderList();
    }
  }

  // ---- status and progress ----------------------------------------------

  function badge(status) {
    const s = str(status) || 'unknown';
    return h('span', { class: `badge ${s}`, 'data-status': s }, s);
  }

  // What the instance is doing now: the step in progress and its retries
  // (from `progress` when the API sends it, else from a `retry` message),
  // or, for a failed one, what failed.
  function progressNode(inst) {
    const p = (inst.progress && typeof inst.progress === 'object') ? inst.progress : inst._retry;
    if (p && typeof p === 'object' && IN_PROGRESS.has(inst.status)) {
      const parts = [];
      if (p.step) parts.push(h('span', { class: 'mono' }, str(p.step)));
      const attempt = Number(p.attempt);
      const max = Number(p.max_attempts);
      if (attempt > 1 || (p.last_error && attempt)) {
        const le = p.last_error;
        const leText = le && typeof le === 'object' ? `${str(le.code)}${le.message ? `: ${str(le.message)}` : ''}` : str(le);
        let when = '';
        const next = micros(p.next_attempt_at);
        if (Number.isFinite(next)) {
          const ms = next / 1000 - Date.now();
          when = ms > 0 ? ` in ${fmtDur(ms * 1000)}` : '';
        }
        parts.push(' ', h('span', { class: 'retry', 'data-retry': 'true' },
          `retry ${attempt}/${Number.isFinite(max) ? max : '?'}${when}`));
        if (leText) parts.push(' ', h('span', { class: 'last-error' }, leText));
      } else if (attempt) {
        parts.push(` attempt ${attempt}${Number.isFinite(max) ? `/${max}` : ''}`);
      }
      return h('span', { class: 'progress' }, parts);
    }
    if (inst.status === 'failed' && inst.error && typeof inst.error === 'object') {
      return h('span', { class: 'progress' }, `${str(inst.error.step)}: ${str(inst.error.code)}`);
    }
    if (IN_PROGRESS.has(inst.status)) return h('span', { class: 'progress' }, '…');
    return h('span', { class: 'progress muted' }, '—');
  }

  // ---- instance list and create form ------------------------------------

  const FIELDS = ['name', 'image', 'env', 'cmd', 'restart'];

  function field(id, label, control, hint) {
    const errId = `err-${id}`;
    const hintId = hint ? `hint-${id}` : null;
    control.setAttribute('id', `f-${id}`);
    control.setAttribute('name', id);
    control.setAttribute('aria-describedby', [hintId, errId].filter(Boolean).join(' '));
    return h('div', { class: id === 'env' ? 'wide' : null },
      h('label', { for: `f-${id}` }, label),
      control,
      hint ? h('div', { id: hintId, class: 'hint' }, hint) : null,
      h('div', { id: errId, class: 'field-error', hidden: true }));
  }

  function createForm() {
    const restart = h('select', null,
      h('option', { value: 'no' }, 'no'),
      h('option', { value: 'on-failure' }, 'on-failure'),
      h('option', { value: 'always' }, 'always'));
    const formErr = h('div', { id: 'create-error', class: 'form-error', role: 'alert', hidden: true });
    const form = h('form', { id: 'create-form', class: 'panel', novalidate: true, 'aria-labelledby': 'create-title' },
      h('h2', { id: 'create-title' }, 'Create an instance'),
      h('div', { class: 'grid' },
        field('name', 'Name', h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false' }), 'Lowercase letters, digits and -'),
        field('image', 'Image', h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false', placeholder: 'busybox' })),
        field('env', 'Environment', h('textarea', { spellcheck: 'false', placeholder: 'KEY=value' }), 'One KEY=value per line; values are secrets, shown as *** afterwards'),
        field('cmd', 'Command (optional)', h('input', { type: 'text', autocomplete: 'off', spellcheck: 'false' }), 'Words separated by spaces'),
        field('restart', 'Restart policy', restart)),
      formErr,
      h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'create-submit' }, 'Create')));

    const clearErrors = () => {
      formErr.hidden = true;
      for (const f of FIELDS) {
        const e = document.getElementById(`err-${f}`);
        if (e) { e.hidden = true; e.textContent = ''; }
        const c = document.getElementById(`f-${f}`);
        if (c) c.removeAttribute('aria-invalid');
      }
    };
    const showError = (fieldPath, message) => {
      const top = str(fieldPath).split(/[.[]/)[0];
      if (FIELDS.includes(top)) {
        const e = document.getElementById(`err-${top}`);
        e.textContent = fieldPath !== top ? `${fieldPath}: ${message}` : message;
        e.hidden = false;
        const c = document.getElementById(`f-${top}`);
        c.setAttribute('aria-invalid', 'true');
        c.focus();
      } else {
        formErr.textContent = fieldPath ? `${fieldPath}: ${message}` : message;
        formErr.hidden = false;
      }
    };

    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      clearErrors();
      const val = (f) => document.getElementById(`f-${f}`).value;
      const env = {};
      const lines = val('env').split(/\r?\n/);
      for (let i = 0; i < lines.length; i++) {
        const line = lines[i];
        if (!line.trim()) continue;
        const eq = line.indexOf('=');
        if (eq <= 0) { showError('env', `line ${i + 1}: expected KEY=value`); return; }
        env[line.slice(0, eq).trim()] = line.slice(eq + 1);
      }
      const body = { name: val('name').trim(), image: val('image').trim(), env, restart: val('restart') };
      const cmd = val('cmd').trim();
      if (cmd) body.cmd = cmd.split(/\s+/);
      const submit = document.getElementById('create-submit');
      submit.disabled = true;
      const r = await api('POST', '/v1/instances', body);
      submit.disabled = false;
      if (r.ok && r.json) {
        const a = r.json;
        const inst = { id: a.id, name: body.name, image: body.image, status: a.status, flow_id: a.flow_id, ip: null, created_at: '' };
        if (!state.instances.has(a.id)) state.instances.set(a.id, inst);
        updated(state.instances.get(a.id));
        scheduleRefresh(a.id);
        announce(`Creating ${body.name}`);
        form.reset();
      } else {
        const e = r.error || {};
        showError(e.field, str(e.message) || 'the server refused the request');
      }
    });
    return form;
  }

  function renderList() {
    const tbody = h('tbody', { id: 'instance-rows' });
    const empty = h('p', { id: 'no-instances', class: 'muted', hidden: true }, 'No instances yet.');
    const table = h('div', { class: 'table-wrap' },
      h('table', { id: 'instances', 'aria-labelledby': 'instances-title' },
        h('thead', null, h('tr', null,
          h('th', { scope: 'col' }, 'Name'),
          h('th', { scope: 'col' }, 'Status'),
          h('th', { scope: 'col' }, 'Step / retries'),
          h('th', { scope: 'col', class: 'opt' }, 'Image'),
          h('th', { scope: 'col', class: 'opt' }, 'IP'))),
        tbody));
    replace(main(), h('h1', { id: 'instances-title' }, 'Instances'), table, empty, createForm());

    const row = (inst) => {
      if (!inst || !inst.id) return;
      let tr = tbody.querySelector(`tr[data-id="${CSS.escape(inst.id)}"]`);
      if (!tr) {
        tr = h('tr', { 'data-id': inst.id });
        tbody.appendChild(tr);
      }
      tr.setAttribute('data-name', str(inst.name));
      tr.setAttribute('data-status', str(inst.status));
      replace(tr,
        h('td', null, h('a', { href: `#/instances/${encodeURIComponent(inst.id)}`, class: 'instance-link' }, str(inst.name))),
        h('td', { class: 'status' }, badge(inst.status)),
        h('td', { class: 'step' }, progressNode(inst)),
        h('td', { class: 'opt mono' }, str(inst.image) || (inst.build ? `build ${str(inst.build)}` : '')),
        h('td', { class: 'opt mono' }, str(inst.ip)));
      empty.hidden = true;
    };

    const refresh = async () => {
      state.listLoading = true;
      state.touchedDuringLoad.clear();
      const seen = [];
      let after = null;
      // A few pages at most: the dashboard is for looking, not for exports.
      for (let page = 0; page < 10; page++) {
        const q = after ? `?after=${encodeURIComponent(after)}` : '';
        const r = await api('GET', `/v1/instances${q}`);
        if (!r.ok || !r.json) break;
        for (const inst of Array.isArray(r.json.instances) ? r.json.instances : []) {
          const old = state.instances.get(inst.id);
          if (old && old._retry && !inst.progress && IN_PROGRESS.has(inst.status)) inst._retry = old._retry;
          state.instances.set(inst.id, inst);
          seen.push(inst.id);
        }
        after = r.json.next;
        if (!after) break;
      }
      state.listLoading = false;
      if (state.view !== view) return;
      for (const id of seen) row(state.instances.get(id));
      empty.hidden = tbody.children.length > 0;
      // Messages that arrived while the list was read may be newer than it.
      for (const id of state.touchedDuringLoad) scheduleRefresh(id);
      state.touchedDuringLoad.clear();
    };
    const view = { name: 'list', row, refresh };
    state.view = view;
    for (const inst of state.instances.values()) row(inst);
    refresh();
  }

  // ---- one instance -----------------------------------------------------

  function renderInstance(id) {
    const title = h('h1', { id: 'instance-title' }, 'Instance');
    const statusLine = h('p', { id: 'instance-status', 'aria-live': 'polite' });
    const facts = h('dl', { class: 'facts', id: 'instance-facts' });
    const errorBox = h('div', { id: 'instance-error', class: 'error-box', role: 'alert', hidden: true });
    const actionMsg = h('p', { id: 'action-result', role: 'status' });
    const conditions = h('tbody', { id: 'conditions' });
    const logs = h('pre', { id: 'logs', class: 'logs', tabindex: '0', 'aria-label': 'Last lines of output' });
    const flowBox = h('div', { id: 'waterfall-box' });
    const flowSummary = h('p', { id: 'flow-summary', class: 'muted' });

    const action = (label, method, path, cls, confirm) => h('button', {
      type: 'button', class: cls || 'secondary', 'data-action': label.toLowerCase(),
      onclick: async (ev) => {
        const b = ev.currentTarget;
        // Deleting asks twice (a second click within 5 s), without a modal
        // dialog that would trap keyboard and screen-reader users.
        if (confirm && b.dataset.armed !== 'true') {
          b.dataset.armed = 'true';
          b.textContent = `Confirm ${label.toLowerCase()}`;
          actionMsg.textContent = `Click again to ${label.toLowerCase()} this instance.`;
          setTimeout(() => { b.dataset.armed = 'false'; b.textContent = label; }, 5000);
          return;
        }
        b.dataset.armed = 'false';
        b.textContent = label;
        b.disabled = true;
        const r = await api(method, path);
        b.disabled = false;
        actionMsg.textContent = r.ok ? `${label}: accepted` : `${label}: ${errText(r.error)}`;
        if (r.ok) scheduleRefresh(id);
      },
    }, label);
    const base = `/v1/instances/${encodeURIComponent(id)}`;
    const actions = h('div', { class: 'actions', role: 'group', 'aria-label': 'Actions' },
      action('Stop', 'POST', `${base}/stop`),
      action('Start', 'POST', `${base}/start`),
      action('Restart', 'POST', `${base}/restart`),
      action('Delete', 'DELETE', base, 'danger', true));

    replace(main(),
      h('p', null, h('a', { href: '#/' }, '← Instances')),
      title, statusLine, errorBox, actions, actionMsg,
      h('section', { class: 'panel', 'aria-labelledby': 'flow-title' },
        h('h2', { id: 'flow-title' }, 'Flow'),
        flowSummary,
        h('div', { class: 'legend', 'aria-hidden': 'true' },
          h('span', { class: 'l-wait' }, 'waiting (queue, back-off)'),
          h('span', { class: 'l-ok' }, 'attempt'),
          h('span', { class: 'l-bad' }, 'failed attempt'),
          h('span', { class: 'l-comp' }, 'compensation'),
          h('span', { class: 'l-event' }, 'event')),
        flowBox),
      h('section', { class: 'panel', 'aria-labelledby': 'facts-title' }, h('h2', { id: 'facts-title' }, 'Details'), facts),
      h('section', { class: 'panel', 'aria-labelledby': 'cond-title' },
        h('h2', { id: 'cond-title' }, 'Conditions'),
        h('div', { class: 'table-wrap' }, h('table', null,
          h('thead', null, h('tr', null,
            h('th', { scope: 'col' }, 'Condition'), h('th', { scope: 'col' }, 'Holds'),
            h('th', { scope: 'col', class: 'opt' }, 'Reason'), h('th', { scope: 'col' }, 'Message'),
            h('th', { scope: 'col', class: 'opt' }, 'Since'))),
          conditions))),
      h('section', { class: 'panel', 'aria-labelledby': 'logs-title' },
        h('h2', { id: 'logs-title' }, 'Logs'),
        h('div', { class: 'actions' }, h('button', { type: 'button', class: 'secondary', id: 'logs-refresh', onclick: () => loadLogs() }, 'Refresh logs')),
        logs));

    let lastFlow = null;
    let lastStatus = null;
    let flowData = null;

    const show = (inst) => {
      title.textContent = str(inst.name) || 'Instance';
      document.title = `${str(inst.name)} · Berth`;
      replace(statusLine, badge(inst.status), ' ', progressNode(inst));
      if (inst.error && typeof inst.error === 'object') {
        const e = inst.error;
        replace(errorBox,
          h('strong', null, `${str(e.code)}`), ` at step ${str(e.step)}`,
          e.attempts ? ` after ${str(e.attempts)} attempt(s)` : '', ': ', str(e.message),
          e.cause ? h('div', { class: 'mono' }, str(e.cause)) : null);
        errorBox.hidden = false;
      } else {
        errorBox.hidden = true;
      }
      const fact = (k, v) => (v === null || v === undefined || v === '' ? null : [h('dt', null, k), h('dd', { class: k === 'Env' ? 'mono env' : 'mono' }, str(v))]);
      const env = inst.env && typeof inst.env === 'object' ? Object.entries(inst.env).map(([k, v]) => `${k}=${str(v)}`).join('\n') : '';
      replace(facts,
        fact('Id', inst.id), fact('Image', inst.image), fact('Build', inst.build), fact('Image id', inst.image_id),
        fact('IP', inst.ip), fact('Host', inst.host), fact('Restart', inst.restart),
        fact('Restarts', inst.restarts), fact('Exit code', inst.exit_code),
        fact('Command', Array.isArray(inst.cmd) ? inst.cmd.join(' ') : null), fact('Env', env),
        fact('Flow', inst.flow_id), fact('Created', inst.created_at ? fmtTime(inst.created_at) : null));
      const conds = Array.isArray(inst.conditions) ? inst.conditions : [];
      replace(conditions, conds.length ? conds.map((c) => h('tr', { 'data-condition': str(c.type) },
        h('td', { class: 'mono' }, str(c.type)),
        h('td', null, c.status ? 'yes' : 'no'),
        h('td', { class: 'opt' }, str(c.reason)),
        h('td', null, str(c.message)),
        h('td', { class: 'opt' }, c.last_transition ? fmtTime(c.last_transition) : ''))) :
        h('tr', null, h('td', { colspan: '5', class: 'muted' }, 'None yet.')));
      if (inst.flow_id && (inst.flow_id !== lastFlow || inst.status !== lastStatus || IN_PROGRESS.has(inst.status))) {
        lastFlow = inst.flow_id;
        loadFlow(inst.flow_id);
      }
      if (inst.status !== lastStatus) {
        lastStatus = inst.status;
        loadLogs();
      }
    };

    const loadFlow = async (flowId) => {
      const r = await api('GET', `/v1/flows/${encodeURIComponent(flowId)}`);
      if (state.view !== view) return;
      if (!r.ok || !r.json) {
        flowData = null;
        replace(flowBox, h('p', { class: 'muted' }, `No trace: ${errText(r.error)}`));
        return;
      }
      flowData = r.json;
      drawFlow();
    };

    const drawFlow = () => {
      if (!flowData) return;
      const rows = flowRows(flowData);
      const attempts = rows.filter((r) => r.kind === 'attempt');
      const failed = attempts.filter((r) => r.failed).length;
      const span = micros(flowData.last_activity_at) - micros(flowData.started_at);
      flowSummary.textContent = `${attempts.length} attempt(s), ${failed} failed, over ${fmtDur(span)}.`;
      replace(flowBox, waterfall(rows, Math.max(300, flowBox.clientWidth || 800)));
    };

    const loadLogs = async () => {
      const r = await api('GET', `${base}/logs?tail=100`);
      if (state.view !== view) return;
      if (r.ok) logs.textContent = r.text || '(no output)';
      else logs.textContent = r.status === 409 ? `No logs: ${str(r.error && r.error.message)}` : `Cannot read logs: ${errText(r.error)}`;
    };

    const refresh = async () => {
      const r = await api('GET', `${base}`);
      if (state.view !== view) return;
      if (r.ok && r.json) {
        state.instances.set(id, r.json);
        show(r.json);
      } else {
        title.textContent = 'Instance not found';
        replace(statusLine, errText(r.error));
      }
    };

    const view = { name: 'instance', id, show, refresh, redraw: drawFlow };
    state.view = view;
    const cached = state.instances.get(id);
    if (cached && cached.name) show(cached);
    refresh();
  }

  // ---- the flow waterfall -----------------------------------------------

  // The flow's tree as rows: one per attempt of each worker at each event
  // (a re-drive's rounds included), an event no worker handled as a mark.
  // Depth follows causation, so a compensation (a worker of `<step>.failed`)
  // sits under the failure that caused it. The wait before an attempt runs
  // from the event (first attempt) or from the end of the previous attempt.
  function flowRows(flow) {
    const rows = [];
    const walk = (ev, depth, comp) => {
      if (!ev || typeof ev !== 'object') return;
      const type = str(ev.type);
      const isComp = comp || /\.failed$/.test(type);
      const created = micros(ev.created_at);
      const attempts = Array.isArray(ev.attempts) ? ev.attempts.slice() : [];
      if (!attempts.length) {
        rows.push({ kind: 'event', depth, label: type, at: created, comp: isComp });
      }
      const byWorker = new Map();
      for (const a of attempts) {
        const w = str(a.worker);
        if (!byWorker.has(w)) byWorker.set(w, []);
        byWorker.get(w).push(a);
      }
      const kids = Array.isArray(ev.children) ? ev.children.slice() : [];
      kids.sort((x, y) => micros(x.created_at) - micros(y.created_at));
      const walked = new Set();
      for (const [worker, list] of byWorker) {
        list.sort((x, y) => (x.round - y.round) || (x.attempt - y.attempt));
        let prevEnd = created;
        for (const a of list) {
          const startAt = micros(a.started_at);
          const dur = Number.isFinite(Number(a.duration_us)) && a.duration_us !== null ? Number(a.duration_us) : NaN;
          const outcome = str(a.outcome);
          const failed = !(outcome === 'ok' || outcome === 'duplicate');
          rows.push({
            kind: 'attempt', depth, label: worker, event: type, attempt: a.attempt, round: a.round || 0,
            waitFrom: Math.min(prevEnd, startAt), start: startAt,
            end: Number.isFinite(dur) ? startAt + dur : startAt, open: !Number.isFinite(dur),
            outcome, failed, error: a.error && typeof a.error === 'object' ? a.error : null,
            comp: isComp,
          });
          prevEnd = Number.isFinite(dur) ? startAt + dur : startAt;
        }
        // The worker's failure event (and the compensation handling it)
        // right under the worker's failed attempt, not after its siblings.
        for (const k of kids) {
          if (str(k.type) === `${worker}.failed` && !walked.has(k)) { walked.add(k); walk(k, depth + 1, isComp); }
        }
      }
      for (const k of kids) if (!walked.has(k)) walk(k, depth + 1, isComp);
    };
    for (const root of Array.isArray(flow.events) ? flow.events : []) walk(root, 0, false);
    return rows;
  }

  function waterfall(rows, width) {
    const narrow = width < 640;
    const labelW = narrow ? 0 : Math.min(320, Math.round(width * 0.32));
    const pad = 8;
    const axisH = 22;
    const barX = labelW + pad;
    const barW = Math.max(60, width - barX - pad);
    const rowH = (r) => (narrow ? 34 : 24) + (r.failed && r.error ? 15 : 0);

    let t0 = Infinity; let t1 = -Infinity;
    for (const r of rows) {
      for (const t of r.kind === 'event' ? [r.at] : [r.waitFrom, r.start, r.end]) {
        if (Number.isFinite(t)) { t0 = Math.min(t0, t); t1 = Math.max(t1, t); }
      }
    }
    if (!Number.isFinite(t0)) { t0 = 0; t1 = 1; }
    const span = Math.max(t1 - t0, 1);
    const x = (t) => barX + (Number.isFinite(t) ? ((t - t0) / span) * barW : 0);

    const height = axisH + rows.reduce((s, r) => s + rowH(r), 0) + 6;
    const root = svg('svg', {
      class: 'waterfall', id: 'waterfall', width, height, viewBox: `0 0 ${width} ${height}`,
      role: 'img', 'aria-labelledby': 'wf-title wf-desc', 'data-rows': rows.length,
    });
    root.appendChild(svg('title', { id: 'wf-title' }, 'Flow waterfall'));
    root.appendChild(svg('desc', { id: 'wf-desc' }, rows.map(describe).join('; ')));

    // Time axis: ticks over the flow's span (fewer on a phone, so their
    // labels do not run into each other).
    const ticks = narrow ? 2 : 4;
    for (let i = 0; i <= ticks; i++) {
      const tx = barX + (barW * i) / ticks;
      root.appendChild(svg('line', { class: 'grid-line', x1: tx, x2: tx, y1: axisH - 4, y2: height }));
      root.appendChild(svg('text', { class: 'axis', x: tx, y: 13, 'text-anchor': i === 0 ? 'start' : i === ticks ? 'end' : 'middle' },
        `+${fmtDur((span * i) / ticks)}`));
    }

    let y = axisH;
    rows.forEach((r, i) => {
      const hgt = rowH(r);
      const g = svg('g', {
        class: `wf-row ${r.kind}`, 'data-kind': r.kind, 'data-step': r.label, 'data-index': i,
        'data-attempt': r.kind === 'attempt' ? r.attempt : null,
        'data-round': r.kind === 'attempt' ? r.round : null,
        'data-outcome': r.kind === 'attempt' ? r.outcome : null,
        'data-compensation': r.comp ? 'true' : null,
      });
      g.appendChild(svg('title', null, describe(r)));
      g.appendChild(svg('rect', { class: 'row-bg', x: 0, y, width, height: hgt, fill: 'transparent' }));
      const indent = 6 + r.depth * 12;
      const label = r.kind === 'attempt'
        ? `${r.label} #${r.attempt}${r.round ? ` (round ${r.round})` : ''}`
        : r.label;
      const labelY = narrow ? y + 12 : y + 16;
      g.appendChild(svg('text', { class: `label${r.comp ? ' comp' : ''}`, x: narrow ? 6 + r.depth * 8 : indent, y: labelY },
        clip(label, narrow ? 60 : Math.max(8, Math.floor((labelW - indent) / 7)))));
      const by = narrow ? y + 17 : y + 6;
      const bh = 12;
      if (r.kind === 'event') {
        g.appendChild(svg('circle', { class: 'mark', cx: x(r.at), cy: by + bh / 2, r: 4 }));
      } else {
        const wx = x(r.waitFrom); const sx = x(r.start); const ex = x(r.end);
        if (sx - wx >= 1) g.appendChild(svg('rect', { class: 'bar-wait', x: wx, y: by + 2, width: sx - wx, height: bh - 4 }));
        g.appendChild(svg('rect', {
          class: `bar-run${r.failed ? ' failed' : ''}${r.comp ? ' comp' : ''}`,
          x: Math.min(sx, barX + barW - 2), y: by, width: Math.max(2, ex - sx), height: bh,
        }));
        const durText = r.open ? 'no end recorded' : fmtDur(r.end - r.start);
        const tx = Math.max(ex + 4, sx + 4);
        const fits = tx + 60 < width;
        g.appendChild(svg('text', { class: 'axis', x: fits ? tx : Math.max(barX + 40, wx - 4), y: by + 10, 'text-anchor': fits ? 'start' : 'end' }, durText));
        if (r.failed && r.error) {
          g.appendChild(svg('text', { class: 'err', x: narrow ? 6 : barX, y: by + bh + 12 },
            clip(`${str(r.error.code)}: ${str(r.error.message)}`, Math.floor((narrow ? width : barW) / 6.2))));
        }
      }
      root.appendChild(g);
      y += hgt;
    });
    return root;
  }

  function describe(r) {
    if (r.kind === 'event') return `event ${r.label}`;
    const wait = r.start - r.waitFrom;
    let s = `${r.comp ? 'compensation ' : ''}${r.label} attempt ${r.attempt}${r.round ? ` round ${r.round}` : ''}: ${r.outcome}`;
    s += `, waited ${fmtDur(wait)}, ran ${r.open ? 'with no end recorded' : fmtDur(r.end - r.start)}`;
    if (r.error) s += ` — ${str(r.error.code)}: ${str(r.error.message)}`;
    return s;
  }

  function clip(s, n) {
    s = str(s);
    return s.length > n ? `${s.slice(0, Math.max(1, n - 1))}…` : s;
  }

  // ---- dead letters -----------------------------------------------------

  function renderDeadLetters() {
    const tbody = h('tbody', { id: 'dead-rows' });
    const all = h('input', { type: 'checkbox', id: 'dl-all' });
    const msg = h('p', { id: 'dl-result', role: 'status' });
    const empty = h('p', { id: 'no-dead-letters', class: 'muted', hidden: true }, 'No dead letters.');
    replace(main(),
      h('h1', { id: 'dl-title' }, 'Dead letters'),
      h('p', { class: 'muted' }, 'Deliveries that will not be retried until re-driven. A re-drive starts a new round of attempts for the same worker.'),
      h('div', { class: 'actions' },
        h('label', { for: 'dl-all', class: 'inline' }, all, ' Include re-driven ones'),
        h('button', { type: 'button', class: 'secondary', id: 'dl-refresh', onclick: () => refresh() }, 'Refresh')),
      msg,
      h('div', { class: 'table-wrap' }, h('table', { id: 'dead-letters', 'aria-labelledby': 'dl-title' },
        h('thead', null, h('tr', null,
          h('th', { scope: 'col' }, 'Worker'),
          h('th', { scope: 'col', class: 'opt' }, 'Event'),
          h('th', { scope: 'col' }, 'Error'),
          h('th', { scope: 'col', class: 'opt' }, 'Attempts'),
          h('th', { scope: 'col', class: 'opt' }, 'Dead since'),
          h('th', { scope: 'col' }, 'Re-drive'))),
        tbody)),
      empty);
    all.addEventListener('change', () => refresh());
    // Re-driven from this page: id -> { d, round }. Such a row stays (marked)
    // when the list is read again, so the outcome of a click does not vanish
    // under the user's pointer; the same letter dead again in a later round
    // shows its button again.
    const done = new Map();

    const row = (d) => {
      const mine = done.get(d.id);
      const cell = h('td', { class: 'redrive' });
      if (mine && !(Number(d.round) >= mine.round && !d.redriven_at)) {
        append(cell, [h('span', { class: 'redriven' }, `re-driven (round ${str(mine.round)})`)]);
        return rowOf(d, cell);
      }
      const redriven = !!d.redriven_at;
      const button = h('button', {
        type: 'button', class: 'secondary', 'data-redrive': d.id, disabled: redriven,
        'aria-label': `Re-drive ${str(d.worker)} of ${str(d.event_type)}`,
        onclick: async () => {
          button.disabled = true;
          const r = await api('POST', `/v1/dead-letters/${encodeURIComponent(d.id)}/redrive`);
          if (r.ok && r.json) {
            done.set(d.id, { d, round: Number(r.json.round) });
            replace(cell, h('span', { class: 'redriven' }, `re-driven (round ${str(r.json.round)})`));
            msg.textContent = `Re-driven ${str(d.worker)}: round ${str(r.json.round)} queued.`;
          } else {
            button.disabled = false;
            msg.textContent = `Cannot re-drive: ${errText(r.error)}`;
          }
        },
      }, 'Re-drive');
      append(cell, [redriven ? h('span', { class: 'redriven' }, `re-driven ${fmtTime(d.redriven_at)}`) : button]);
      return rowOf(d, cell);
    };

    const rowOf = (d, cell) => {
      const e = d.error && typeof d.error === 'object' ? d.error : {};
      return h('tr', { 'data-dl-id': d.id, 'data-worker': str(d.worker) },
        h('td', { class: 'mono' }, str(d.worker)),
        h('td', { class: 'opt mono' }, str(d.event_type)),
        h('td', null, h('strong', null, str(e.code)), ` (${str(d.reason)}) `, str(e.message)),
        h('td', { class: 'opt' }, str(d.attempts)),
        h('td', { class: 'opt' }, fmtTime(d.dead_at)),
        cell);
    };

    const refresh = async () => {
      const r = await api('GET', `/v1/dead-letters${all.checked ? '?all=true' : ''}`);
      if (state.view !== view) return;
      if (!r.ok || !r.json) { msg.textContent = `Cannot list dead letters: ${errText(r.error)}`; return; }
      const list = Array.isArray(r.json.dead_letters) ? r.json.dead_letters.slice() : [];
      for (const [id, mine] of done) {
        if (!list.some((d) => d.id === id)) list.push(mine.d);
      }
      replace(tbody, list.map(row));
      empty.hidden = list.length > 0;
    };
    const view = { name: 'dead', refresh };
    state.view = view;
    refresh();
  }

  // ---- boot -------------------------------------------------------------

  // A bug of this page shows as one, instead of a view that silently stops.
  const pageError = (what) => {
    let el = document.getElementById('page-error');
    if (!el) {
      el = h('p', { id: 'page-error', class: 'error-box', role: 'alert' });
      document.body.insertBefore(el, main());
    }
    el.textContent = `The page failed: ${str(what)}. Reloading may help.`;
  };
  window.addEventListener('error', (ev) => pageError(ev.message));
  window.addEventListener('unhandledrejection', (ev) => pageError(ev.reason && ev.reason.message ? ev.reason.message : ev.reason));

  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (state.view && state.view.redraw) state.view.redraw(); }, 150);
  });
  window.addEventListener('hashchange', () => { route(); window.scrollTo(0, 0); main().focus({ preventScroll: true }); });
  document.getElementById('logout').addEventListener('click', () => logout());
  if (state.token) start(); else renderLogin();
})();

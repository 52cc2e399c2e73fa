// segproxy's live dashboard. No data is in the page: everything comes from /dashboard/api/*,
// fetched with the operator token as "Authorization: Bearer" (taken from the URL fragment,
// "#token=...", which browsers never send to a server, or typed in the form). Live updates are
// server-sent events read from a streamed fetch() body (EventSource cannot send a header).
'use strict'

const HISTORY = 120 // points kept per chart (one a second: two minutes)
const state = {
  token: '',
  prev: null, // the previous update, for rates
  series: { accepted: [], delivered: [], p50: [], p99: [], depth: [], age: [] },
  events: [],
  picked: null,
  keyMask: null, // the masked form of a whole write key typed in the filter
  keyFor: '', // the key filter keyMask was computed for
  deadCount: '',
  aborter: null,
}

const $ = (id) => document.getElementById(id)

function api(path, init = {}) {
  const headers = Object.assign({}, init.headers || {})
  if (state.token) headers.authorization = 'Bearer ' + state.token
  return fetch('api/' + path, Object.assign({}, init, { headers, cache: 'no-store' }))
}

// -- start: the token ----------------------------------------------------------------------

function start() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash)
  if (m) {
    state.token = decodeURIComponent(m[1])
    sessionStorage.setItem('segproxy-token', state.token)
    history.replaceState(null, '', location.pathname) // keep it out of the address bar
  } else {
    state.token = sessionStorage.getItem('segproxy-token') || ''
  }
  $('login').addEventListener('submit', (ev) => {
    ev.preventDefault()
    state.token = $('token').value
    sessionStorage.setItem('segproxy-token', state.token)
    connect()
  })
  for (const id of ['f-key', 'f-type', 'f-name']) $(id).addEventListener('input', onFilter)
  connect()
}

function needToken(message) {
  $('main').hidden = true
  $('login').hidden = false
  $('login-error').textContent = message
  setConn(false, 'token needed')
}

function setConn(on, text) {
  const c = $('conn')
  c.className = 'conn ' + (on ? 'on' : 'off')
  c.textContent = text
}

// -- the live stream -----------------------------------------------------------------------

async function connect() {
  if (state.aborter) state.aborter.abort()
  const aborter = (state.aborter = new AbortController())
  let retry = 1000
  while (!aborter.signal.aborted) {
    try {
      const resp = await api('stream', { signal: aborter.signal })
      if (resp.status === 401) {
        needToken(state.token ? 'That token was refused.' : '')
        return
      }
      if (!resp.ok || !resp.body) throw new Error('HTTP ' + resp.status)
      $('login').hidden = true
      $('main').hidden = false
      setConn(true, 'live')
      retry = 1000
      await readEvents(resp.body, onUpdate)
    } catch (err) {
      if (aborter.signal.aborted) return
    }
    setConn(false, 'reconnecting…')
    await new Promise((resolve) => setTimeout(resolve, retry))
    retry = Math.min(retry * 2, 10000)
  }
}

async function readEvents(body, onData) {
  const reader = body.getReader()
  const decoder = new TextDecoder()
  let buffer = ''
  for (;;) {
    const { value, done } = await reader.read()
    if (done) return
    buffer += decoder.decode(value, { stream: true })
    let end
    while ((end = buffer.indexOf('\n\n')) >= 0) {
      const block = buffer.slice(0, end)
      buffer = buffer.slice(end + 2)
      const data = block
        .split('\n')
        .filter((line) => line.startsWith('data: '))
        .map((line) => line.slice(6))
        .join('\n')
      if (data) onData(JSON.parse(data))
    }
  }
}

// -- an update -----------------------------------------------------------------------------

function rate(now, prev, read) {
  if (!prev) return null
  const a = read(now)
  const b = read(prev)
  const dt = now.time - prev.time
  if (a == null || b == null || dt <= 0) return null
  return Math.max(0, (a - b) / dt)
}

// The numbers are the proxy's counters since it started (the same /metrics shows): rates are
// differences between two updates.
const accepted = (u) => u.numbers.events.accepted
const delivered = (u) => u.numbers.events.forwarded
const cacheHits = (u) => u.numbers.cdn_cache.hit + u.numbers.cdn_cache.stale
const cacheLookups = (u) => u.numbers.cdn_cache.hit + u.numbers.cdn_cache.miss + u.numbers.cdn_cache.stale
const sum = (obj) => Object.values(obj || {}).reduce((a, b) => a + b, 0)
// An upstream's failures: network errors, and answers that say it is unwell or misdirected
// (5xx, 429, redirects). A 4xx about one request (an unknown write key, an invalid event) is
// the request's fault, not the upstream's.
const unwell = (status) => /^[35]/.test(status) || status === '429'
const upstreamFailures = (up) =>
  sum(up.errors) + sum(Object.fromEntries(Object.entries(up.responses || {}).filter(([s]) => unwell(s))))

// The q-quantile (ms) of the requests answered between two updates, from the cumulative
// histogram buckets of a route class (linear within a bucket, as Prometheus's
// histogram_quantile does); null when none were answered.
function quantile(now, prev, q) {
  const a = now && now.buckets
  if (!a) return null
  const b = (prev && prev.buckets) || {}
  const bounds = Object.keys(a).sort((x, y) => (x === '+Inf') - (y === '+Inf') || Number(x) - Number(y))
  const counts = bounds.map((le) => a[le] - (b[le] || 0))
  const total = counts[counts.length - 1]
  if (!(total > 0)) return null
  const rank = q * total
  let lower = 0
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i] >= rank) {
      const upper = bounds[i] === '+Inf' ? lower : Number(bounds[i])
      const below = i > 0 ? counts[i - 1] : 0
      const within = counts[i] - below
      const at = within > 0 ? (rank - below) / within : 1
      return 1000 * (lower + (upper - lower) * at)
    }
    if (bounds[i] !== '+Inf') lower = Number(bounds[i])
  }
  return null
}

function push(name, value) {
  const s = state.series[name]
  s.push(value)
  if (s.length > HISTORY) s.shift()
}

function fmt(n, digits = 1) {
  if (n == null || Number.isNaN(n)) return '–'
  if (Math.abs(n) >= 1e6) return (n / 1e6).toFixed(digits) + 'M'
  if (Math.abs(n) >= 1e4) return (n / 1e3).toFixed(digits) + 'k'
  return Number.isInteger(n) ? String(n) : n.toFixed(digits)
}

function age(seconds) {
  if (seconds == null) return '–'
  if (seconds < 120) return seconds.toFixed(1) + ' s'
  if (seconds < 7200) return (seconds / 60).toFixed(1) + ' min'
  return (seconds / 3600).toFixed(1) + ' h'
}

function onUpdate(u) {
  const prev = state.prev
  state.prev = u
  $('updated').textContent = 'updated ' + new Date(u.time * 1000).toLocaleTimeString()
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1)
  const acc = rate(u, prev, accepted)
  const del = rate(u, prev, delivered)
  push('accepted', acc)
  push('delivered', del)
  $('n-accepted').textContent = fmt(acc)
  $('n-delivered').textContent = fmt(del)
  const track = u.numbers.request_duration_seconds.track
  const was = prev ? prev.numbers.request_duration_seconds.track : null
  const p50 = quantile(track, was, 0.5)
  const p99 = quantile(track, was, 0.99)
  push('p50', p50)
  push('p99', p99)
  $('n-latency').textContent = p50 == null ? '–' : fmt(p50, 2) + ' / ' + fmt(p99, 2)
  showQueue(u.numbers.queue, u.queue, u.numbers.events.dead)
  showUpstream(u, prev)
  const lookups = rate(u, prev, cacheLookups)
  const hits = rate(u, prev, cacheHits)
  $('n-cache').textContent = lookups ? Math.round((100 * hits) / lookups) + ' %' : '–'
  drawAll()
  state.events = u.events
  showEvents()
}

function showQueue(q, file, deadSeen) {
  if (!q) {
    $('n-queue').textContent = '–'
    $('n-queue-sub').textContent = 'no queue (passthrough)'
    push('depth', null)
    push('age', null)
    return
  }
  $('n-queue').textContent = fmt(q.events, 0)
  $('n-queue-sub').textContent = 'events, ' + fmt(q.bytes / 1024) + ' KB'
  $('n-age').textContent = age(q.oldest_age_seconds)
  push('depth', q.events)
  push('age', q.oldest_age_seconds)
  const dead = file && !file.error ? file.dead : null
  $('n-dead').textContent = fmt(dead, 0)
  // Reload the list when a dead letter is kept or leaves (replayed)
  const mark = dead + '/' + deadSeen
  if (mark !== state.deadCount) {
    state.deadCount = mark
    loadDead()
  }
}

function showUpstream(u, prev) {
  const parts = []
  let bad = false
  for (const name of ['api', 'cdn']) {
    const now = u.numbers.upstream[name]
    const failures = upstreamFailures(now)
    const recent = prev ? failures - upstreamFailures(prev.numbers.upstream[name]) : 0
    if (recent > 0) bad = true
    parts.push(name + ' ' + (recent > 0 ? 'failing' : 'ok') + ' (' + failures + ' failed)')
  }
  // The last fault a key's events met, from the queue file (segproxy queue stats says it too)
  const faults = u.queue && u.queue.per_key ? Object.values(u.queue.per_key) : []
  const last = faults.filter((k) => k.last_fault).sort((a, b) => a.last_fault_age_seconds - b.last_fault_age_seconds)[0]
  $('n-upstream').textContent = bad ? 'failing' : 'ok'
  $('n-upstream').className = 'big ' + (bad ? 'bad' : '')
  $('n-upstream-sub').textContent = parts.join(', ') + (last ? '; last fault: ' + last.last_fault : '')
}

// -- charts (canvas, no library) -----------------------------------------------------------

function drawAll() {
  draw($('c-throughput'), state.series.accepted, state.series.delivered)
  draw($('c-latency'), state.series.p50, state.series.p99)
  draw($('c-queue'), state.series.depth, state.series.age)
}

function draw(canvas, a, b) {
  const ctx = canvas.getContext('2d')
  const w = canvas.width
  const h = canvas.height
  ctx.clearRect(0, 0, w, h)
  const values = a.concat(b).filter((v) => v != null)
  const max = Math.max(1, ...values) * 1.15
  ctx.strokeStyle = '#2a3642'
  ctx.fillStyle = '#8a98a6'
  ctx.font = '11px system-ui, sans-serif'
  for (let i = 0; i <= 4; i++) {
    const y = h - 14 - ((h - 24) * i) / 4
    ctx.beginPath()
    ctx.moveTo(36, y)
    ctx.lineTo(w, y)
    ctx.stroke()
    ctx.fillText(fmt((max * i) / 4, max < 8 ? 1 : 0), 2, y + 4)
  }
  line(ctx, a, max, w, h, '#4fb3ff')
  line(ctx, b, max, w, h, '#ffb347')
}

function line(ctx, values, max, w, h, color) {
  ctx.strokeStyle = color
  ctx.lineWidth = 2
  ctx.beginPath()
  let moved = false
  values.forEach((v, i) => {
    if (v == null) {
      moved = false
      return
    }
    // The last minute at least across the width, then up to HISTORY points as they come
    const span = Math.max(60, values.length)
    const x = 36 + ((w - 40) * (i + span - values.length)) / (span - 1)
    const y = h - 14 - ((h - 24) * v) / max
    if (moved) ctx.lineTo(x, y)
    else ctx.moveTo(x, y)
    moved = true
  })
  ctx.stroke()
  ctx.lineWidth = 1
}

// -- the event debugger --------------------------------------------------------------------

async function onFilter() {
  const key = $('f-key').value.trim()
  state.keyMask = null
  if (key && !key.includes('…') && window.crypto && crypto.subtle) {
    // The list shows keys masked as segproxy masks them (a prefix and a digest): mask the
    // typed key the same way here, so the whole key never leaves this page.
    const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(key))
    const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('')
    state.keyMask = (key.length > 8 ? key.slice(0, 6) : key.slice(0, 2)) + '…' + hex.slice(0, 6)
  }
  state.keyFor = key
  showEvents()
}

function matches(e) {
  const key = $('f-key').value.trim()
  const type = $('f-type').value
  const name = $('f-name').value.trim().toLowerCase()
  if (key && e.key !== state.keyMask && !e.key.includes(key)) return false
  if (type && e.type !== type) return false
  if (name && !e.name.toLowerCase().includes(name)) return false
  return true
}

function cell(tr, text, cls) {
  const td = document.createElement('td')
  td.textContent = text
  if (cls) td.className = cls
  tr.appendChild(td)
}

function showEvents() {
  const body = $('events').tBodies[0]
  const shown = state.events.filter(matches)
  const rows = shown.map((e) => {
    const tr = document.createElement('tr')
    tr.dataset.seq = e.seq
    tr.dataset.type = e.type
    if (e.seq === state.picked) tr.className = 'picked'
    cell(tr, new Date(e.receivedAt * 1000).toLocaleTimeString())
    cell(tr, e.type)
    cell(tr, e.name)
    cell(tr, e.key)
    cell(tr, e.status + (e.detail ? ' (' + e.detail + ')' : ''), 'status-' + e.status)
    tr.addEventListener('click', () => openEvent(e.seq))
    return tr
  })
  body.replaceChildren(...rows)
  const key = $('f-key').value.trim()
  if (state.keyFor === key) {
    // The filter the list now shows (for tests and for the curious: it is the inputs' values)
    $('events').dataset.filter = [key, $('f-type').value, $('f-name').value.trim()].join('|')
  }
  $('f-count').textContent = shown.length + ' of ' + state.events.length + ' latest events'
}

async function openEvent(seq) {
  state.picked = seq
  showEvents()
  const detail = $('detail')
  const resp = await api('events/' + seq)
  const data = await resp.json()
  const pre = document.createElement('pre')
  pre.id = 'event-json'
  if (!resp.ok) {
    pre.textContent = data.message
  } else {
    pre.textContent = JSON.stringify(data.event, null, 2)
  }
  const head = document.createElement('p')
  head.className = 'muted'
  head.textContent = resp.ok
    ? data.type + ' ' + data.name + ' (' + data.key + '): ' + data.status
    : 'not available'
  detail.replaceChildren(head, pre)
}

// -- dead letters --------------------------------------------------------------------------

async function loadDead() {
  const resp = await api('dead')
  if (!resp.ok) return
  const data = await resp.json()
  $('dead-note').textContent = data.available
    ? data.dead.length
      ? 'Events Segment refused for good. Replay sends one again.'
      : 'None.'
    : 'Dead letters are kept by the sqlite queue only.'
  const rows = data.dead.map((d) => {
    const tr = document.createElement('tr')
    tr.dataset.id = d.id
    const ev = d.event || {}
    cell(tr, String(d.id))
    cell(tr, new Date(d.diedAt * 1000).toLocaleTimeString())
    cell(tr, d.key)
    cell(tr, ev.type || '')
    cell(tr, ev.event || ev.name || '')
    cell(tr, d.status + ' ' + d.reason)
    const td = document.createElement('td')
    const button = document.createElement('button')
    button.textContent = 'Replay'
    button.className = 'replay'
    button.addEventListener('click', () => replay(d.id, button))
    td.appendChild(button)
    tr.appendChild(td)
    return tr
  })
  $('dead').tBodies[0].replaceChildren(...rows)
}

async function replay(id, button) {
  button.disabled = true
  const resp = await api('dead/' + id + '/replay', { method: 'POST' })
  const data = await resp.json()
  button.textContent = resp.ok ? 'replayed' : data.message
  state.deadCount = '' // reload the list with the next update
}

start()

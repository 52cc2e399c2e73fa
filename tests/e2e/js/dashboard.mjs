// Drive segproxy's live dashboard in Debian's chromium with playwright-core, as an operator:
// open it, watch the numbers move while events flow, filter the event list, open one event's
// JSON, replay a dead letter, keep a screenshot.
//
// Usage: node dashboard.mjs '{"url": ".../dashboard/#token=...", "screenshot": "PATH", ...}'
// Protocol on stdout (one JSON document per line, each tagged):
//   LIVE {...}      the page is live: connected, events listed, rates shown
//   MOVED {...}     two readings of the page, a few updates apart
//   FILTER {...}    what the list showed for each filter
//   EVENT {...}     the JSON shown for the event opened
//   DEAD {...}      a dead letter with its replay button is listed; then waits for a stdin line
//   REPLAYED {...}  the replay button was pressed and the proxy said so
//   RESULT {...}    the screenshot, page errors, failed requests (always last)
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { chromium } from 'playwright-core'

const opts = JSON.parse(process.argv[2] ?? '{}')
const timeout = opts.timeoutMs ?? 30000
const emit = (tag, obj) => process.stdout.write(`${tag} ${JSON.stringify(obj)}\n`)
const lines = createInterface({ input: process.stdin })
const nextLine = () => new Promise((resolve) => lines.once('line', resolve))

const userDataDir = mkdtempSync(join(tmpdir(), 'segproxy-dashboard-'))
const pageErrors = []
const consoleErrors = []
const failed = []
let context
let exitCode = 0

// What the operator sees: the cards, and the rows of the event list as shown.
const reading = (page) =>
  page.evaluate(() => {
    const text = (id) => document.getElementById(id).textContent
    const rows = Array.from(document.querySelectorAll('#events tbody tr')).map((tr) => {
      const cells = Array.from(tr.cells, (td) => td.textContent)
      return { type: cells[1], name: cells[2], key: cells[3], status: cells[4] }
    })
    return {
      conn: text('conn'),
      updated: text('updated'),
      accepted: text('n-accepted'),
      delivered: text('n-delivered'),
      latency: text('n-latency'),
      queue: text('n-queue'),
      dead: text('n-dead'),
      upstream: text('n-upstream'),
      count: text('f-count'),
      rows,
    }
  })

async function filtered(page, field, value) {
  if (field === 'f-type') await page.selectOption('#f-type', value)
  else await page.fill('#' + field, value)
  // The list is redrawn on input (a key's digest is computed first, asynchronously): read it
  // once it says it shows this filter.
  const want = ['f-key', 'f-type', 'f-name'].map((f) => (f === field ? value : '')).join('|')
  await page.waitForSelector(`#events[data-filter="${want}"]`, { state: 'attached', timeout })
  const seen = await reading(page)
  if (field === 'f-type') await page.selectOption('#f-type', '')
  else await page.fill('#' + field, '')
  return seen
}

try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: opts.executablePath ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    ],
    timeout,
  })
  const page = context.pages()[0] ?? (await context.newPage())
  page.on('pageerror', (err) => pageErrors.push(String(err && err.stack ? err.stack : err)))
  page.on('console', (msg) => {
    if (msg.type() === 'error') consoleErrors.push(msg.text())
  })
  context.on('requestfailed', (req) => {
    // The live stream is aborted when the page closes: not a failure.
    if (!req.url().endsWith('/api/stream')) failed.push({ url: req.url(), error: req.failure()?.errorText })
  })
  await page.goto(opts.url, { waitUntil: 'load', timeout })

  await page.waitForFunction(
    () =>
      document.getElementById('conn').textContent === 'live' &&
      document.querySelectorAll('#events tbody tr').length >= 3 &&
      Number(document.getElementById('n-delivered').textContent) > 0 &&
      Number(document.getElementById('n-accepted').textContent) > 0 &&
      document.getElementById('n-latency').textContent !== '–',
    null,
    { timeout, polling: 100 },
  )
  const first = await reading(page)
  emit('LIVE', { ...first, address: page.url() })
  await page.waitForFunction(
    (before) => document.getElementById('updated').textContent !== before,
    first.updated,
    { timeout },
  )
  await page.waitForFunction(
    (before) => document.getElementById('n-queue').textContent !== '–' &&
      document.getElementById('f-count').textContent !== before,
    first.count,
    { timeout, polling: 100 },
  )
  emit('MOVED', { first, later: await reading(page) })

  emit('FILTER', {
    name: await filtered(page, 'f-name', opts.filterName),
    type: await filtered(page, 'f-type', 'page'),
    key: await filtered(page, 'f-key', opts.writeKey),
    otherKey: await filtered(page, 'f-key', opts.otherKey),
  })

  await page.click('#events tbody tr:first-child')
  await page.waitForSelector('#event-json', { timeout })
  emit('EVENT', { json: await page.textContent('#event-json') })

  await page.waitForSelector('#dead tbody tr button.replay', { timeout })
  const dead = await page.evaluate(() => {
    const tr = document.querySelector('#dead tbody tr')
    return { id: tr.dataset.id, text: tr.textContent }
  })
  emit('DEAD', dead)
  await nextLine()
  await page.click('#dead tbody tr button.replay')
  await page.waitForFunction(
    () => Array.from(document.querySelectorAll('#dead button')).some((b) => b.textContent === 'replayed'),
    null,
    { timeout },
  )
  emit('REPLAYED', await reading(page))
  // Enough updates for the charts to draw lines, then the picture the test keeps.
  await page.waitForFunction((n) => Number(document.body.dataset.updates) >= n, opts.updatesShown ?? 8, {
    timeout,
  })
  await page.screenshot({ path: opts.screenshot, fullPage: true })
  emit('RESULT', { screenshot: opts.screenshot, pageErrors, consoleErrors, failed })
} catch (err) {
  exitCode = 1
  emit('RESULT', { fatal: String(err && err.stack ? err.stack : err), pageErrors, consoleErrors, failed })
} finally {
  lines.close()
  if (context) await context.close().catch(() => {})
  rmSync(userDataDir, { recursive: true, force: true })
}
process.exit(exitCode)

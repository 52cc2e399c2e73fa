// Drive Debian's chromium with playwright-core: open one page, wait until it reports done,
// tell the caller, wait for the caller's go-ahead, then report what the browser saw.
//
// Usage: node browser.mjs '{"url": "...", "timeoutMs": 30000}'
// Protocol on stdout (one JSON document per line):
//   READY {"page": <window.__segproxyTest>, "analytics": {...}}   once the page set done=true
//   RESULT {"console": [...], "pageErrors": [...], "requests": [...], "failed": [...], ...}
// Between the two the script waits for a line (or EOF) on stdin, so the caller can first make
// sure the events arrived upstream while the page is still open (batching flushes on a timer).
// Nothing leaves the machine: every host name but 127.0.0.1 resolves to NOTFOUND.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { chromium } from 'playwright-core'

const opts = JSON.parse(process.argv[2] ?? '{}')
const timeoutMs = opts.timeoutMs ?? 30000
const executablePath = opts.executablePath ?? '/usr/bin/chromium'

function emit(tag, obj) {
  process.stdout.write(`${tag} ${JSON.stringify(obj)}\n`)
}

function waitForStdin(ms) {
  return new Promise((resolve) => {
    const rl = createInterface({ input: process.stdin })
    const timer = setTimeout(() => done('timeout'), ms)
    function done(why) {
      clearTimeout(timer)
      rl.close()
      resolve(why)
    }
    rl.once('line', () => done('line'))
    rl.once('close', () => done('eof'))
  })
}

// Playwright reports a request asynchronously (over CDP), so the caller can see an event arrive
// upstream before we have heard of the request that carried it. Before reporting, poll (with a
// deadline) until every resource the page itself has a timing entry for is among the requests
// we saw, and every request we saw has finished or failed.
async function settle(page, ms) {
  const deadline = Date.now() + ms
  let missing = []
  let open = []
  for (;;) {
    const entries = await page
      .evaluate(() => performance.getEntriesByType('resource').map((e) => e.name))
      .catch(() => [])
    const seen = new Set(requests.map((r) => r.url))
    missing = entries.filter((u) => !seen.has(u) && !u.startsWith('data:'))
    open = requests.filter((r) => !r.done).map((r) => r.url)
    if ((missing.length === 0 && open.length === 0) || Date.now() > deadline) break
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
  return { ok: missing.length === 0 && open.length === 0, missing, open }
}

const userDataDir = mkdtempSync(join(tmpdir(), 'segproxy-chromium-'))
const consoleMessages = []
const pageErrors = []
const requests = []
const failed = []
const responses = []
let context
let exitCode = 0
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    ],
    timeout: timeoutMs,
  })
  // The first (blank) page of a persistent context is reused.
  const page = context.pages()[0] ?? (await context.newPage())
  page.on('console', (msg) =>
    consoleMessages.push({ type: msg.type(), text: msg.text(), location: msg.location() }),
  )
  page.on('pageerror', (err) => pageErrors.push(String(err && err.stack ? err.stack : err)))
  const byRequest = new Map()
  context.on('request', (req) => {
    const entry = {
      url: req.url(),
      method: req.method(),
      resourceType: req.resourceType(),
      headers: req.headers(),
      postData: req.method() === 'POST' ? req.postData() : null,
      done: false,
    }
    byRequest.set(req, entry)
    requests.push(entry)
  })
  const markDone = (req) => {
    const entry = byRequest.get(req)
    if (entry) entry.done = true
  }
  context.on('requestfinished', markDone)
  context.on('requestfailed', (req) => {
    markDone(req)
    failed.push({ url: req.url(), method: req.method(), error: req.failure()?.errorText ?? '' })
  })
  context.on('response', (res) =>
    responses.push({ url: res.url(), status: res.status(), method: res.request().method() }),
  )

  await page.goto(opts.url, { waitUntil: 'load', timeout: timeoutMs })
  let ready
  try {
    await page.waitForFunction(() => window.__segproxyTest && window.__segproxyTest.done, null, {
      timeout: timeoutMs,
      polling: 50,
    })
    ready = { ok: true }
  } catch (err) {
    ready = { ok: false, error: String(err) }
  }
  const state = await page.evaluate(() => {
    const a = window.analytics
    const safe = (f) => {
      try {
        return f()
      } catch (e) {
        return { error: String(e) }
      }
    }
    return {
      page: window.__segproxyTest ?? null,
      analytics: {
        initialized: safe(() => Boolean(a && a.initialized)),
        cdn: safe(() => a && a._cdn),
        version: safe(() => a && a.VERSION),
        cdnSettings: safe(() => (a && a.settings ? a.settings.cdnSettings : null)),
        cdnURL: safe(() => (a && a.settings ? a.settings.cdnURL ?? null : null)),
        anonymousId: safe(() => a && a.user().anonymousId()),
      },
    }
  })
  emit('READY', { ...ready, ...state })
  const why = await waitForStdin(timeoutMs)
  const settled = await settle(page, 5000)
  emit('RESULT', {
    release: why,
    settled,
    console: consoleMessages,
    pageErrors,
    requests,
    failed,
    responses,
  })
} catch (err) {
  exitCode = 1
  emit('RESULT', {
    fatal: String(err && err.stack ? err.stack : err),
    console: consoleMessages,
    pageErrors,
    requests,
    failed,
    responses,
  })
} finally {
  if (context) await context.close().catch(() => {})
  rmSync(userDataDir, { recursive: true, force: true })
}
process.exit(exitCode)

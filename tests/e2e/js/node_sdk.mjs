// Send N events with the real @segment/analytics-node SDK, then report what it sent.
//
// Usage: node node_sdk.mjs '{"writeKey": "...", "host": "http://127.0.0.1:PORT", "n": 200}'
// Prints one JSON document: {"sent": [{"messageId", "type", "i"}...], "errors": [...]}.
// Events with an odd index carry their own context.ip (it must survive the proxy); the SDK
// generates every messageId itself, as in production, and the callback tells us which.
import { Analytics } from '@segment/analytics-node'

const opts = JSON.parse(process.argv[2] ?? '{}')
const n = opts.n ?? 200
const analytics = new Analytics({
  writeKey: opts.writeKey,
  host: opts.host,
  path: opts.path ?? '/v1/batch',
  flushAt: opts.flushAt ?? 50,
  flushInterval: opts.flushInterval ?? 200,
  maxRetries: opts.maxRetries ?? 3,
  httpRequestTimeout: opts.httpRequestTimeout ?? 10000,
})
const errors = []
analytics.on('error', (err) => errors.push(String(err && err.reason ? err.reason : err)))

const sent = []
const pending = []
for (let i = 0; i < n; i++) {
  const params = {
    userId: `node-user-${i % 7}`,
    properties: { i, label: `node-${i}`, nested: { even: i % 2 === 0, list: [i, 'x'] } },
  }
  if (i % 2 === 1) params.context = { ip: '203.0.113.9' }
  const kind = i % 10 === 0 ? 'identify' : 'track'
  pending.push(
    new Promise((resolve) => {
      const callback = (err, ctx) => {
        if (err) errors.push(`event ${i}: ${String(err)}`)
        sent.push({ i, type: kind, messageId: ctx ? ctx.event.messageId : null })
        resolve()
      }
      if (kind === 'identify') {
        analytics.identify({ ...params, traits: params.properties }, callback)
      } else {
        analytics.track({ ...params, event: 'Node Event' }, callback)
      }
    }),
  )
}
try {
  await analytics.closeAndFlush({ timeout: opts.timeoutMs ?? 60000 })
  await Promise.all(pending)
} catch (err) {
  errors.push(`closeAndFlush: ${String(err)}`)
}
sent.sort((a, b) => a.i - b.i)
process.stdout.write(JSON.stringify({ sent, errors }) + '\n')

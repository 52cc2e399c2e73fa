// Render the official Segment snippet (npm @segment/snippet) for a given write key and host.
//
// Usage: node snippet.mjs '{"writeKey": "...", "host": "127.0.0.1:PORT", "scheme": "http"}'
// Prints the minified snippet on stdout. @segment/snippet always writes "https://<host>"; over
// plain http (the tests' loopback proxy) the scheme of that one URL is switched, nothing else.
// `_cdn` is deliberately NOT set (no `useHostForBundles`): the proxy must make the bundle find
// its CDN by itself.
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const snippet = require('@segment/snippet')

const opts = JSON.parse(process.argv[2] ?? '{}')
const scheme = opts.scheme ?? 'https'
let text = snippet.min({
  apiKey: opts.writeKey,
  host: opts.host,
  page: opts.page ?? true,
  load: opts.load ?? true,
  useHostForBundles: false,
})
const httpsUrl = `"https://${opts.host}/`
if (!text.includes(httpsUrl)) {
  console.error(`snippet.mjs: expected ${httpsUrl} in the rendered snippet`)
  process.exit(2)
}
if (scheme !== 'https') text = text.replace(httpsUrl, `"${scheme}://${opts.host}/`)
process.stdout.write(text)

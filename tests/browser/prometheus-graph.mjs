// Screenshots Prometheus's graph page with the dashboard's main queries, for docs/operations.md's
// picture of the worker's figures (docs/prometheus-graph.png). Run against a Prometheus that
// scrapes a busy worker: PROMETHEUS_URL=http://127.0.0.1:9090 OUT=docs/prometheus-graph.png
// node tests/browser/prometheus-graph.mjs
import { chromium } from 'playwright-core';

const base = process.env.PROMETHEUS_URL || 'http://127.0.0.1:9090';
const out = process.env.OUT || 'prometheus-graph.png';
const range = process.env.RANGE || '15m';
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const queries = [
  'sum(rate(payment_link_commands_succeeded_total[1m]))',
  'sum by (error_type) (rate(payment_link_commands_dead_lettered_total[1m]))',
  'histogram_quantile(0.99, sum by (le) (rate(http_client_request_duration_seconds_bucket[1m])))',
  'sum by (payment_provider_id) (rate(payment_link_provider_calls_total[1m]))',
];
const params = queries
  .map((q, i) => `g${i}.expr=${encodeURIComponent(q)}&g${i}.tab=0&g${i}.range_input=${range}`)
  .join('&');

const browser = await chromium.launch({
  executablePath,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
  await page.goto(`${base}/graph?${params}`, { waitUntil: 'networkidle' });
  // Each panel draws its chart once its query has answered.
  await page.waitForFunction(
    (n) => document.querySelectorAll('canvas').length >= n,
    queries.length,
    { timeout: 30000 },
  ).catch(() => {});
  // The navigation bar is fixed to the top of the window: in a full-page picture it would sit
  // across a chart.
  await page.addStyleTag({ content: '.navbar.fixed-top { position: static !important; }' });
  await page.waitForTimeout(2000);
  await page.screenshot({ path: out, fullPage: true });
} finally {
  await browser.close();
}

// Drives the operators' console in headless Chromium as a person would: sign in, filter by kind,
// open a dead letter, replay a selection, watch the job end, find the audit entry, and be asked
// before replaying a dead letter that fails again, then fix that one's amount on its page. Started by
// tests/it/browser.rs, which checks the outcome in the database; a screenshot of each page goes
// to $SHOTS_DIR. Any step that does not find what it expects throws, and the process exits 1.
import { chromium } from 'playwright-core';

const base = process.env.CONSOLE_URL;
const token = process.env.CONSOLE_TOKEN;
const shots = process.env.SHOTS_DIR;
const kind = process.env.FILTER_KIND;
const operator = process.env.OPERATOR_NAME;
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';

function check(condition, what) {
  if (!condition) throw new Error(`expected ${what}`);
}

const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(15000);
  const dialogs = [];
  // Every question is answered yes, except whether to include dead letters that fail again
  // (and, once, whether to go on at all: `refuseNext`).
  let refuseNext = false;
  page.on('dialog', (dialog) => {
    dialogs.push(dialog.message());
    if (refuseNext) { refuseNext = false; dialog.dismiss(); return; }
    if (dialog.message().startsWith('Include the dead letters that will fail again')) dialog.dismiss(); else dialog.accept();
  });

  await page.goto(`${base}/dead-letters`);
  check(page.url().endsWith('/login'), `the sign-in page, not ${page.url()}`);
  await page.screenshot({ path: `${shots}/login.png` });
  await page.fill('#token', token);
  await Promise.all([page.waitForURL(`${base}/`), page.click('#sign-in')]);
  const open = Number(await page.textContent('#count-open'));
  check(open > 0, `open dead letters on the overview, got ${open}`);
  await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });

  await page.goto(`${base}/dead-letters`);
  await page.selectOption('#kind', kind);
  await Promise.all([page.waitForURL(/kind=/), page.click('#apply')]);
  const kinds = await page.$$eval('#letters tr[data-id] .badge', (els) => els.map((e) => e.textContent));
  check(kinds.length >= 2 && kinds.every((k) => k === kind), `only ${kind} rows, got ${kinds}`);
  await page.screenshot({ path: `${shots}/list.png`, fullPage: true });

  const first = await page.getAttribute('#letters tr[data-id]', 'data-id');
  await page.click(`#letters tr[data-id="${first}"] td:nth-child(2) a`);
  await page.waitForURL(`${base}/dead-letters/${first}`);
  const body = await page.textContent('#body');
  check(body.includes('"invoiceId": '), `the pretty-printed body, got ${body}`);
  check(body.includes('"amountInMajorCurrency": 3.00'), `the amount exactly as sent, got ${body}`);
  await page.screenshot({ path: `${shots}/detail.png`, fullPage: true });

  await page.goBack();
  const picks = await page.$$('#letters input.pick');
  await picks[0].check();
  await picks[1].check();
  const chosen = await page.$$eval('#letters input.pick:checked', (els) => els.map((e) => Number(e.value)));
  await Promise.all([page.waitForURL(/\/replays\/\d+$/), page.click('#replay-selected')]);
  check(dialogs.some((d) => d.includes('Replay 2 dead letter(s)?')), `a confirmation naming the count, got ${dialogs}`);
  await page.waitForFunction(() => document.getElementById('state')?.textContent === 'done');
  const replayed = await page.textContent('#replayed');
  check(replayed === '2', `2 replayed, got ${replayed}`);
  const job = Number(page.url().split('/').pop());
  await page.screenshot({ path: `${shots}/job.png`, fullPage: true });

  await page.goto(`${base}/audit`);
  const rows = await page.$$eval('#audit tr', (els) => els.map((e) => e.textContent));
  check(rows.some((r) => r.includes(operator) && r.includes('replay') && r.includes(String(job))), `the replay in the audit log, got ${rows}`);
  await page.screenshot({ path: `${shots}/audit.png`, fullPage: true });

  // A dead letter that fails again as it is: the console asks; skipping it leaves it open.
  await page.goto(`${base}/dead-letters?kind=validation`);
  const invalid = await page.getAttribute('#letters tr[data-id]', 'data-id');
  await page.goto(`${base}/dead-letters/${invalid}`);
  // Cancel at the first question replays nothing: no run starts, the page stays.
  const runsBefore = (await (await page.request.get(`${base}/api/replays`)).json()).items.length;
  const asked = dialogs.length;
  refuseNext = true;
  await page.click('#replay-one');
  for (let i = 0; i < 150 && dialogs.length < asked + 1; i++) await page.waitForTimeout(100);
  check(dialogs.length === asked + 1, `exactly one question before Cancel, got ${dialogs.slice(asked)}`);
  const runsAfter = (await (await page.request.get(`${base}/api/replays`)).json()).items.length;
  check(runsAfter === runsBefore && page.url().endsWith(`/dead-letters/${invalid}`), `Cancel replays nothing: ${runsBefore} runs before, ${runsAfter} after, at ${page.url()}`);
  await Promise.all([page.waitForURL(/\/replays\/\d+$/), page.click('#replay-one')]);
  check(dialogs.some((d) => d.includes('1 of the selected dead letters fail again')), `the question about failing again, got ${dialogs}`);
  await page.waitForFunction(() => document.getElementById('state')?.textContent === 'done');
  const skipped = await page.textContent('#skipped');
  check(skipped === '1', `1 skipped, got ${skipped}`);

  // Fixed instead: the same letter's amount edited on its page and sent as a new command.
  await page.goto(`${base}/dead-letters/${invalid}`);
  await page.click('#edit summary');
  await page.fill('#edit-amountInMajorCurrency', '3.00');
  await page.fill('#edit-reason', 'the amount was negative');
  await Promise.all([page.waitForEvent('load'), page.click('#edit-send')]);
  const edited = await page.textContent('#edited-into');
  check(edited.includes('~edit1'), `the letter points at its edited copy, got ${edited}`);
  await page.screenshot({ path: `${shots}/edited.png`, fullPage: true });

  console.log(JSON.stringify({ job, replayed: chosen, edited: Number(invalid) }));
} finally {
  await browser.close();
}

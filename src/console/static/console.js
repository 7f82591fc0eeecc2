const csrf = document.querySelector('meta[name=csrf]')?.content || '';
async function call(url, body) {
  const r = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf}, body: JSON.stringify(body)});
  return {status: r.status, json: await r.json().catch(() => ({}))};
}
function selectedIds() {
  return [...document.querySelectorAll('input.pick:checked')].map(c => Number(c.value));
}
async function act(kind, target, count) {
  if (!count) { alert('Nothing selected.'); return; }
  const verb = kind === 'replay' ? 'Replay' : 'Archive';
  if (!confirm(`${verb} ${count} dead letter(s)?`)) return;
  if (kind === 'archive') {
    const r = await call('/api/dead-letters/archive', target);
    if (r.status !== 200) { alert(r.json.error || ('failed: ' + r.status)); return; }
    alert(`Archived ${r.json.archived} dead letter(s).`);
    location.reload();
    return;
  }
  const body = Object.assign({}, target);
  // The run's guard: an empty field keeps the default (a canary for runs of more than 10,
  // a stop when half of the last 20 settled letters fail again).
  for (const [field, key] of [['rate', 'rate'], ['start-rate', 'startRate'], ['canary', 'canary'], ['max-failure-ratio', 'maxFailureRatio']]) {
    const v = document.getElementById(field)?.value;
    if (v) body[key] = Number(v);
  }
  let r = await call('/api/replays', Object.assign(body, {askIfFailing: true}));
  if (r.status === 409 && r.json.failAgain) {
    // Cancel always means "do nothing": the choice about these letters is a second question.
    if (!confirm(r.json.error + '\n\nOK: go on (the next question asks whether to include them). Cancel: replay nothing.')) return;
    const include = confirm('Include the dead letters that will fail again? OK: replay them too (they will be dead-lettered again). Cancel: skip them and replay the rest.');
    r = await call('/api/replays', Object.assign(body, include ? {includeFailing: true} : {askIfFailing: false}));
  }
  if (r.status === 409 && r.json.atRisk) {
    if (!confirm(r.json.error + '\n\nI accept the risk: replay anyway?')) return;
    r = await call('/api/replays', Object.assign(body, {acceptDuplicateRisk: true}));
  }
  if (r.status !== 202) { alert(r.json.error || ('failed: ' + r.status)); return; }
  location.href = '/replays/' + r.json.jobId;
}
document.addEventListener('click', e => {
  const b = e.target.closest('button[data-act]');
  if (!b) return;
  const all = b.dataset.scope === 'all';
  const ids = b.dataset.ids ? JSON.parse(b.dataset.ids) : selectedIds();
  const target = all ? {filter: JSON.parse(b.dataset.filter)} : {ids};
  act(b.dataset.act, target, all ? Number(b.dataset.count) : ids.length);
});
document.getElementById('pick-all')?.addEventListener('change', e => {
  document.querySelectorAll('input.pick').forEach(c => c.checked = e.target.checked);
});
async function watch(id) {
  const r = await fetch('/api/replays/' + id);
  const j = await r.json();
  const done = j.replayed + j.failed + j.skipped;
  document.getElementById('bar').style.width = (j.total ? 100 * done / j.total : 100) + '%';
  for (const k of ['state', 'total', 'replayed', 'failed', 'skipped']) document.getElementById(k).textContent = j[k];
  const o = j.outcomes || {};
  for (const [k, v] of [['succeeded', o.succeeded], ['failed-again', o.failedAgain], ['pending', o.pending], ['stop-reason', j.stopReason || '']]) {
    const e = document.getElementById(k);
    if (e) e.textContent = v;
  }
  document.getElementById('resume')?.toggleAttribute('hidden', j.state !== 'stopped');
  // Outcomes settle after the run has sent its letters: keep watching while any is pending.
  if (j.state === 'running' || o.pending) setTimeout(() => watch(id), j.state === 'running' ? 500 : 2000);
}
document.getElementById('resume')?.addEventListener('click', async e => {
  const id = e.target.dataset.id;
  if (!confirm('Send the letters this run left open? Its canary goes first again.')) return;
  const r = await call('/api/replays/' + id + '/resume', {});
  if (r.status !== 202) { alert(r.json.error || ('failed: ' + r.status)); return; }
  watch(id);
});
const job = document.getElementById('job');
if (job) watch(job.dataset.id);
// Bar heights come as data attributes: the content security policy runs no inline style.
document.querySelectorAll('.bars div[data-h]').forEach(d => { d.style.height = d.dataset.h + '%'; });
// The edit form: only the fields changed are sent; a value that is JSON is sent as JSON (a
// number keeps its digits), anything else as text.
document.getElementById('edit-form')?.addEventListener('submit', async e => {
  e.preventDefault();
  const form = e.target;
  const fields = {};
  for (const input of form.querySelectorAll('input[data-initial]')) {
    if (input.value === input.dataset.initial) continue;
    let value;
    try { value = JSON.parse(input.value); } catch { value = input.value; }
    fields[input.name] = value;
  }
  if (!Object.keys(fields).length) { alert('Nothing changed.'); return; }
  const reason = form.querySelector('[name=reason]').value;
  // Numbers go as written: JSON.stringify would round a long amount through a float.
  const raw = Object.entries(fields).map(([k, v]) => {
    const input = form.querySelector(`input[name="${k}"]`).value;
    return JSON.stringify(k) + ':' + (typeof v === 'number' ? input.trim() : JSON.stringify(v));
  });
  const r = await fetch('/api/dead-letters/' + form.dataset.id + '/edit', {
    method: 'POST',
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': csrf},
    body: '{"fields":{' + raw.join(',') + '},"reason":' + JSON.stringify(reason) + '}',
  });
  const j = await r.json().catch(() => ({}));
  if (r.status !== 202) { alert(j.error || ('failed: ' + r.status)); return; }
  location.reload();
});

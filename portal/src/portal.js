// The portal's few actions: create, roll and revoke keys through the JSON API, each with the
// session's CSRF token (from the page's <meta>). The plaintext of a new key is shown once.
(function () {
  const meta = document.querySelector('meta[name="csrf-token"]');
  if (!meta) return;
  const csrf = meta.content;
  async function call(method, path, body) {
    const init = { method, headers: { 'X-CSRF-Token': csrf }, credentials: 'same-origin' };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const r = await fetch(path, init);
    const text = await r.text();
    const json = text ? JSON.parse(text) : null;
    if (!r.ok) throw new Error((json && json.detail) || r.statusText);
    return json;
  }
  function showSecret(created) {
    const box = document.getElementById('secret');
    document.getElementById('secret-value').textContent = created.key;
    box.hidden = false;
    box.dataset.keyId = created.id;
  }
  const copy = document.getElementById('copy');
  if (copy) copy.addEventListener('click', () => {
    navigator.clipboard.writeText(document.getElementById('secret-value').textContent);
    copy.textContent = 'Copied';
  });
  const form = document.getElementById('create-key');
  if (form) form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const description = form.elements.description.value;
    try {
      showSecret(await call('POST', '/api/keys', description ? { description } : {}));
      await refreshTable();
    } catch (err) { alert(err.message); }
  });
  async function refreshTable() {
    const r = await fetch('/keys', { credentials: 'same-origin' });
    const doc = new DOMParser().parseFromString(await r.text(), 'text/html');
    const fresh = doc.getElementById('keys');
    const table = document.getElementById('keys');
    if (fresh && table) table.replaceWith(fresh);
  }
  document.addEventListener('click', async (e) => {
    const roll = e.target.dataset && e.target.dataset.roll;
    const revoke = e.target.dataset && e.target.dataset.revoke;
    try {
      if (roll) {
        const grace = Number(document.querySelector('select[data-grace="' + roll + '"]').value);
        showSecret(await call('POST', '/api/keys/' + roll + '/roll', { graceSecs: grace }));
        await refreshTable();
      } else if (revoke) {
        if (!confirm('Revoke this key now? Requests with it will be refused at once.')) return;
        await call('DELETE', '/api/keys/' + revoke);
        await refreshTable();
      }
    } catch (err) { alert(err.message); }
  });
  // Try-it console (docs page): the request goes from this page to the gateway with the key
  // typed in the field; nothing is stored and nothing passes through the portal.
  document.addEventListener('submit', async (e) => {
    const form = e.target.closest('form.try');
    if (!form) return;
    e.preventDefault();
    const out = form.querySelector('output');
    const status = out.querySelector('.status');
    const answer = out.querySelector('.answer');
    out.hidden = false;
    const key = document.querySelector('#try-key input[name="key"]').value.trim();
    if (!key) { status.textContent = 'Type your API key above first.'; answer.textContent = ''; return; }
    const init = { method: form.dataset.method, headers: { 'Authorization': 'Bearer ' + key }, credentials: 'omit' };
    if (form.elements.body) {
      init.headers['Content-Type'] = 'application/json';
      init.body = form.elements.body.value || '{}';
    }
    status.textContent = 'Sending…';
    answer.textContent = '';
    try {
      const r = await fetch(form.dataset.url, init);
      const shown = ['ratelimit', 'ratelimit-policy', 'retry-after', 'x-request-id']
        .filter((h) => r.headers.get(h) !== null)
        .map((h) => h + ': ' + r.headers.get(h));
      let text = await r.text();
      try { text = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON: as sent */ }
      status.textContent = r.status + ' ' + r.statusText;
      answer.textContent = shown.join('\n') + (shown.length ? '\n\n' : '') + text;
    } catch (err) {
      status.textContent = 'No answer: the gateway refused this page (its route needs this portal in cors_origins) or is unreachable.';
    }
  });
})();

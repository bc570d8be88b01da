// A button with data-confirm asks before its form is sent; once asked, the server's own
// confirmation step is skipped (confirm=1). Without JavaScript the server asks instead.
document.addEventListener("submit", function (event) {
  "use strict";
  const button = event.submitter;
  if (!button || !button.dataset.confirm) return;
  if (!window.confirm(button.dataset.confirm)) {
    event.preventDefault();
    return;
  }
  const confirmed = document.createElement("input");
  confirmed.type = "hidden";
  confirmed.name = "confirm";
  confirmed.value = "1";
  event.target.appendChild(confirmed);
});

// Live progress on the batch page: poll the batch's JSON, backing off while nothing changes
// (1 s doubling to 15 s) so a forgotten tab does not hammer the server. Everything that
// changes with the counts is written here the way templates/progress.html and batch.html
// write it: the state badge, the bar, the summary, the counts, the filter links, the notes and
// which actions are offered. Text only: nothing from the data becomes markup.
(function () {
  "use strict";
  const section = document.getElementById("batch");
  if (!section) return;
  const url = section.dataset.batchUrl;
  const PARTS = ["sent", "dead", "suppressed", "cancelled"];
  let delay = 1000;
  let last = "";

  function summary(batch) {
    const c = batch.counts;
    let text = c.sent + " delivered · " + c.dead + " failed · " + c.suppressed + " suppressed · " +
      c.cancelled + " cancelled of " + batch.total;
    const left = batch.total - c.sent - c.dead - c.suppressed - c.cancelled;
    if (left > 0) text += " · " + left + " to go";
    return text;
  }

  function renderBar(batch) {
    const bar = document.getElementById("batch-bar");
    if (!bar) return;
    let x = 0;
    for (const part of PARTS) {
      const rect = bar.querySelector('[data-part="' + part + '"]');
      const width = batch.total ? (batch.counts[part] * 1000) / batch.total : 0;
      if (rect) {
        rect.setAttribute("x", String(x));
        rect.setAttribute("width", String(width));
      }
      x += width;
    }
    bar.setAttribute("aria-label", summary(batch));
  }

  // The filter links: "all", then each status with recipients (and the one being shown).
  function renderFilters(batch) {
    const nav = document.getElementById("filters");
    if (!nav) return;
    const current = nav.dataset.filter;
    const links = [];
    const all = document.createElement("a");
    all.href = nav.dataset.base;
    all.textContent = "all";
    if (!current) all.setAttribute("aria-current", "page");
    links.push(all);
    for (const [name, n] of Object.entries(batch.counts)) {
      if (!n && name !== current) continue;
      const link = document.createElement("a");
      link.href = nav.dataset.base + "?status=" + encodeURIComponent(name);
      link.dataset.filter = name;
      link.textContent = name + " (" + n + ")";
      if (name === current) link.setAttribute("aria-current", "page");
      links.push(link);
    }
    nav.replaceChildren.apply(nav, links);
  }

  function show(id, visible) {
    const element = document.getElementById(id);
    if (element) element.hidden = !visible;
  }

  function render(batch) {
    const badge = document.getElementById("batch-status");
    badge.textContent = batch.status.replace(/_/g, " ");
    badge.className = "status status-" + batch.status;
    badge.dataset.status = batch.status;
    renderBar(batch);
    document.getElementById("batch-summary").textContent = summary(batch);
    for (const [name, n] of Object.entries(batch.counts)) {
      const cell = section.querySelector('[data-count="' + name + '"]');
      if (cell) cell.textContent = String(n);
    }
    renderFilters(batch);
    show("batch-scheduled", batch.status === "scheduled");
    show("batch-paused", batch.status === "paused");
    const until = document.getElementById("batch-paused-until");
    if (until && batch.paused_until) until.textContent = batch.paused_until.slice(0, 19).replace("T", " ");
    show("cancel-batch", batch.progress.finished < 1 && batch.status !== "cancelled");
    show("redrive-batch", batch.counts.dead > 0);
    const redrive = document.getElementById("redrive-button");
    if (redrive) redrive.textContent = "Redrive " + batch.counts.dead + " dead letter(s)";
  }

  // Rebuild the first page of recipients.
  async function refreshRecipients() {
    const body = document.getElementById("recipients");
    if (!body) return;
    const response = await fetch(body.dataset.url, { credentials: "same-origin" });
    if (!response.ok) return;
    const page = await response.json();
    const rows = page.recipients.map(function (r) {
      const row = document.createElement("tr");
      const badge = document.createElement("span");
      badge.className = "status status-" + r.status;
      badge.textContent = r.status;
      [r.email, badge, String(r.attempts), r.last_error || ""].forEach(function (value) {
        const cell = document.createElement("td");
        if (typeof value === "string") cell.textContent = value; else cell.appendChild(value);
        row.appendChild(cell);
      });
      return row;
    });
    body.replaceChildren.apply(body, rows);
  }

  async function tick() {
    try {
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
      if (response.ok) {
        const batch = await response.json();
        const seen = batch.status + " " + JSON.stringify(batch.counts);
        const changed = seen !== last;
        delay = changed ? 1000 : Math.min(delay * 2, 15000);
        last = seen;
        render(batch);
        if (changed) await refreshRecipients();
        // Every recipient is final: nothing more will change unless an operator acts.
        if (batch.progress.finished >= 1) return;
      } else {
        delay = Math.min(delay * 2, 15000);
      }
    } catch (e) {
      delay = Math.min(delay * 2, 15000);
    }
    setTimeout(tick, delay);
  }
  setTimeout(tick, delay);
})();

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
// (1 s doubling to 15 s) so a forgotten tab does not hammer the server.
(function () {
  "use strict";
  const section = document.getElementById("batch");
  if (!section) return;
  const url = section.dataset.batchUrl;
  let delay = 1000;
  let last = "";

  function render(batch) {
    document.getElementById("batch-status").textContent = batch.status;
    document.getElementById("batch-status").className = "status status-" + batch.status;
    document.getElementById("batch-progress").value = batch.progress;
    document.getElementById("batch-done").textContent = (batch.progress * 100).toFixed(1);
    for (const [name, n] of Object.entries(batch.counts)) {
      const cell = section.querySelector('[data-count="' + name + '"]');
      if (cell) cell.textContent = String(n);
    }
  }

  // Rebuild the first page of recipients; text only, so nothing from the data becomes markup.
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
        const seen = JSON.stringify(batch.counts);
        const changed = seen !== last;
        delay = changed ? 1000 : Math.min(delay * 2, 15000);
        last = seen;
        render(batch);
        if (changed) await refreshRecipients();
        if (batch.status === "done") {
          // Finished while we watched: render once more server-side (actions, filters).
          if (section.dataset.status !== "done") window.location.reload();
          return;
        }
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

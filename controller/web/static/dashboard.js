// The dashboard's behaviour: modal dialogs, form guards, and live drain results.
// Plain script, no build step; every page works without it except opening the dialogs.
"use strict";

// A button with data-open="ID" opens <dialog id="ID"> as a modal; data-close closes its dialog.
document.addEventListener("click", (event) => {
  const opener = event.target.closest("[data-open]");
  if (opener) {
    const dialog = document.getElementById(opener.dataset.open);
    if (dialog) dialog.showModal();
    return;
  }
  const closer = event.target.closest("[data-close]");
  if (closer) closer.closest("dialog").close();
});

document.addEventListener("submit", (event) => {
  const form = event.target;
  // Forms that undo work (revert) ask first.
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
    event.preventDefault();
    return;
  }
  // A double click must not start a second drain of the same host.
  if (form.method === "post") {
    if (form.dataset.sent) {
      event.preventDefault();
      return;
    }
    form.dataset.sent = "1";
  }
});

// Force only means something with a target host: keep its checkbox off without one.
document.addEventListener("change", (event) => {
  const select = event.target.closest("[data-force-needs]");
  if (!select) return;
  const force = select.form.elements.namedItem("force");
  force.disabled = select.value === "";
  if (force.disabled) force.checked = false;
});

function showRow(tr, row) {
  tr.className = "row-" + row.status;
  const badge = tr.querySelector("[data-field=status] .badge");
  badge.textContent = row.status;
  badge.className = "badge status-" + row.status;
  const progress = row.status === "migrating" ? row.progress : null;
  const bar = tr.querySelector("[data-field=status] progress");
  bar.hidden = !progress;
  if (progress) bar.value = progress.fraction;
  tr.querySelector("[data-field=percent]").textContent =
    progress ? Math.round(progress.fraction * 100) + "%" : "";
  tr.querySelector("[data-field=error]").textContent = row.error || "";
  const link = tr.querySelector("[data-field=migration] a");
  if (row.migration_id !== null) {
    link.textContent = "#" + row.migration_id;
    link.hidden = false;
  }
}

function showDrain(box, drain) {
  for (const [key, count] of Object.entries(drain.totals)) {
    const cell = box.querySelector(`[data-total="${key}"]`);
    if (cell) cell.textContent = count;
  }
  const status = box.querySelector("[data-drain-status]");
  status.textContent = drain.status;
  status.className = "badge status-" + drain.status;
  box.dataset.status = drain.status;
  for (const row of drain.rows) {
    const tr = box.querySelector(`tr[data-server="${CSS.escape(row.server)}"]`);
    if (tr) showRow(tr, row);
  }
  box.querySelector("[data-updated]").textContent = "updated " + new Date().toLocaleTimeString();
}

// The results page asks for its drain every poll-ms until the drain is done.
function followDrain(box) {
  const every = Number(box.dataset.pollMs) || 1000;
  async function tick() {
    try {
      const answer = await fetch(box.dataset.url, {headers: {Accept: "application/json"}, cache: "no-store"});
      if (answer.status === 401) {
        window.location.reload();  // the session ended: the reload leads to the login
        return;
      }
      if (answer.ok) showDrain(box, await answer.json());
    } catch (err) {
      // The controller may be restarting: the next tick tries again.
    }
    if (box.dataset.status !== "done") window.setTimeout(tick, every);
  }
  if (box.dataset.status !== "done") window.setTimeout(tick, every);
}

const drainBox = document.getElementById("drain");
if (drainBox) followDrain(drainBox);

// A list with migrations under way shows their progress by reloading itself, but not while a
// dialog or a timeline is open: the reload would close it under the reader.
const refreshing = document.querySelector("[data-refresh-ms]");
if (refreshing) {
  const every = Number(refreshing.dataset.refreshMs);
  const reload = () => {
    if (document.querySelector("dialog[open], details[open]")) window.setTimeout(reload, every);
    else window.location.reload();
  };
  window.setTimeout(reload, every);
}

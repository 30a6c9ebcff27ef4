// Writes go to the JSON endpoints, with the session's CSRF token (from the page's meta tag) in a
// header. The label page's keyboard, undo and skip; the review page's selection, threshold count and
// progress; search's drop target and bulk labels; duplicates' "delete the others". No inline
// script: the content security policy runs only this file.
"use strict";

const CHUNK = 5000; // ids per write (the page takes at most 10,000)

function status(text) { document.getElementById("status").textContent = text; }

function csrfToken() { return document.querySelector('meta[name="csrf-token"]').content; }

async function call(url, options = {}) {
  const reply = await fetch(url, { credentials: "same-origin", ...options });
  const data = await reply.json().catch(() => ({ error: reply.status, message: reply.statusText }));
  if (!reply.ok) { status(`${data.error}: ${data.message}`); throw new Error(data.message); }
  return data;
}

function post(url, body) {
  return call(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
    body: JSON.stringify(body),
  });
}

// One write per CHUNK cards: bodyOf(cards) is the body of each.
async function postInChunks(url, cards, bodyOf) {
  let updated = 0;
  for (let start = 0; start < cards.length; start += CHUNK) {
    updated += (await post(url, bodyOf(cards.slice(start, start + CHUNK)))).updated;
  }
  return updated;
}

const labelsOf = (cards, labelOf) => ({ labels: Object.fromEntries(cards.map((c) => [c.dataset.id, labelOf(c)])) });

// A card's state: a class (its style) and a text badge.
function setState(card, state, text) {
  card.classList.remove("state-open", "state-accepted", "state-rejected", "state-relabelled", "state-labelled", "state-skipped", "state-deleted");
  if (state) card.classList.add(`state-${state}`);
  card.classList.toggle("done", Boolean(state));
  const badge = card.querySelector(".state-badge");
  if (badge) badge.textContent = text || "";
}

// Checkboxes (.pick-box) on the cards of `root`: shift-click selects the range since the last click.
function setUpSelection(root) {
  const boxes = () => [...root.querySelectorAll(".pick-box")];
  const count = document.getElementById("selected-count");
  let last = null;
  const show = () => { if (count) count.textContent = `${boxes().filter((b) => b.checked).length} selected`; };
  root.addEventListener("click", (e) => {
    if (!e.target.classList.contains("pick-box")) return;
    const all = boxes();
    if (e.shiftKey && last !== null) {
      const [a, b] = [all.indexOf(last), all.indexOf(e.target)].sort((x, y) => x - y);
      all.slice(a, b + 1).forEach((box) => { box.checked = e.target.checked; });
    }
    last = e.target;
    show();
  });
  const selectAll = document.getElementById("select-all");
  if (selectAll) selectAll.addEventListener("click", () => { const all = boxes(); const on = !all.every((b) => b.checked); all.forEach((b) => { b.checked = on; }); show(); });
  return {
    cards: () => boxes().filter((b) => b.checked).map((b) => b.closest(".card")),
    clear: () => { boxes().forEach((b) => { b.checked = false; }); show(); },
  };
}

// -- label page ----------------------------------------------------------------------------------
function setUpLabelPage(queue) {
  const keys = new Map(JSON.parse(queue.dataset.keys).filter(([key]) => key));
  const writable = document.body.dataset.writable === "true";
  const undoButton = document.getElementById("undo");
  const history = []; // {card, kind: "label" | "skip", before: the card's label before}
  let writes = Promise.resolve(); // one write after the other: an undo follows the write it undoes

  const cards = () => [...queue.querySelectorAll(".card")];
  function select(card) {
    cards().forEach((c) => c.classList.remove("selected"));
    if (card) { card.classList.add("selected"); card.focus(); }
  }
  function selectNext(card) {
    const all = cards();
    const after = all.slice(all.indexOf(card) + 1).concat(all.slice(0, all.indexOf(card)));
    select(after.find((c) => !c.classList.contains("done")));
  }
  function show(card) {
    const label = card.dataset.label;
    if (card.dataset.skipped === "true") setState(card, "skipped", "skipped");
    else if (label) setState(card, "labelled", `labelled ${label}`);
    else setState(card, "", "");
  }
  async function refreshCounts() {
    const counts = await call("/api/counts");
    for (const name of ["labelled", "predicted", "unlabelled", "items"]) {
      document.getElementById(`count-${name}`).textContent = counts[name];
    }
  }
  // The page shows an action at once; its write goes out after the ones before it. A refused write
  // (its message is in the status line) puts the card back as it was and leaves the undo history.
  function write(url, body, done, failed = () => {}) {
    writes = writes.then(() => post(url, body)).then(() => { done(); refreshCounts().catch(() => {}); }, failed);
  }
  function record(entry) { history.push(entry); undoButton.disabled = false; }
  function forget(entry) { const n = history.indexOf(entry); if (n >= 0) history.splice(n, 1); undoButton.disabled = !history.length; }

  function labelCard(card, label) {
    if (!label || !writable) return;
    const id = card.dataset.id;
    const entry = { card, kind: "label", before: card.dataset.label };
    record(entry);
    card.dataset.label = label;
    show(card);
    selectNext(card);
    write("/api/labels", { labels: { [id]: label } }, () => status(`${id}: ${label}`), () => { card.dataset.label = entry.before; show(card); forget(entry); });
  }
  function skipCard(card) {
    const id = card.dataset.id;
    const entry = { card, kind: "skip" };
    record(entry);
    card.dataset.skipped = "true";
    show(card);
    selectNext(card);
    write("/api/skipped", { ids: [id], skipped: true }, () => status(`${id}: skipped`), () => { card.dataset.skipped = "false"; show(card); forget(entry); });
  }
  function undo() {
    const entry = history.pop();
    undoButton.disabled = !history.length;
    if (!entry) return;
    const { card, kind, before } = entry;
    const id = card.dataset.id;
    if (kind === "label") {
      card.dataset.label = before;
      write("/api/labels", { labels: { [id]: before } }, () => status(`undone: ${id} ${before ? `is ${before} again` : "has no label again"}`));
    } else {
      card.dataset.skipped = "false";
      write("/api/skipped", { ids: [id], skipped: false }, () => status(`undone: ${id} is no longer skipped`));
    }
    show(card);
    select(card);
  }

  undoButton.addEventListener("click", undo);
  queue.addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    if (!card) return;
    const button = e.target.closest("button");
    if (button && button.classList.contains("set-label")) labelCard(card, button.dataset.label);
    else if (button && button.classList.contains("accept-vote")) labelCard(card, card.dataset.vote);
    else if (button && button.classList.contains("set-new-label")) labelCard(card, card.querySelector(".new-label").value.trim());
    else if (button && button.classList.contains("skip")) skipCard(card);
    else if (!e.target.closest("a, input")) select(card);
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") {
      if (e.key === "Enter" && e.target.classList.contains("new-label")) { labelCard(e.target.closest(".card"), e.target.value.trim()); e.preventDefault(); }
      return;
    }
    if (e.altKey || e.metaKey) return;
    if ((e.key === "u" && !e.ctrlKey) || (e.ctrlKey && e.key.toLowerCase() === "z")) { undo(); e.preventDefault(); return; }
    if (e.ctrlKey) return;
    const card = queue.querySelector(".card.selected");
    if (!card) return;
    if (e.key === "ArrowRight") { skipCard(card); e.preventDefault(); }
    else if (e.key === "Enter") { labelCard(card, card.dataset.vote); e.preventDefault(); }
    else if (keys.has(e.key.toLowerCase())) { labelCard(card, keys.get(e.key.toLowerCase())); e.preventDefault(); }
  });
  const unskip = document.getElementById("unskip-all");
  if (unskip) unskip.addEventListener("click", () => post("/api/skipped/clear", {}).then(() => window.location.reload()));
}

// -- review page ---------------------------------------------------------------------------------
function reviewed(card, state, label) {
  const text = state === "relabelled" ? `relabelled: ${label}` : state;
  setState(card, state, text);
}

function setUpReviewPage(proposals) {
  const selection = setUpSelection(proposals);
  const accept = (cards) => postInChunks("/api/labels", cards, (chunk) => labelsOf(chunk, (c) => c.dataset.label))
    .then((n) => { cards.forEach((c) => reviewed(c, "accepted")); return n; });
  const reject = (cards) => postInChunks("/api/reject", cards, (chunk) => ({ ids: chunk.map((c) => c.dataset.id) }))
    .then((n) => { cards.forEach((c) => reviewed(c, "rejected")); return n; });
  const relabel = (cards, label) => postInChunks("/api/labels", cards, (chunk) => labelsOf(chunk, () => label))
    .then((n) => { cards.forEach((c) => reviewed(c, c.dataset.label === label ? "accepted" : "relabelled", label)); return n; });

  proposals.addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    const button = e.target.closest("button");
    if (!card || !button) return;
    if (button.classList.contains("accept")) accept([card]).then(() => status(`${card.dataset.id}: ${card.dataset.label}`));
    if (button.classList.contains("reject")) reject([card]).then(() => status(`${card.dataset.id}: rejected`));
  });
  const bulk = (id, done, fn) => {
    const button = document.getElementById(id);
    if (button) button.addEventListener("click", () => {
      const cards = selection.cards();
      if (!cards.length) { status("select some cards first"); return; }
      fn(cards).then((n) => { status(`${n} ${done}`); selection.clear(); }, () => {});
    });
  };
  bulk("accept-selected", "accepted", accept);
  bulk("reject-selected", "rejected", reject);
  bulk("relabel-selected", "relabelled", (cards) => {
    const label = document.getElementById("relabel-as").value.trim();
    if (!label) { status("type the label to give first"); return Promise.reject(new Error("no label")); }
    return relabel(cards, label);
  });
  const form = document.getElementById("accept-above");
  if (form) setUpAcceptAbove(form);
}

function setUpAcceptAbove(form) {
  const output = document.getElementById("would-accept");
  const button = document.getElementById("accept-above-button");
  const view = () => ({ label: form.dataset.label, low: parseFloat(form.dataset.low), high: parseFloat(form.dataset.high) });
  let asked = 0;
  async function count() {
    const threshold = form.threshold.value;
    const mine = ++asked;
    const query = new URLSearchParams({ ...view(), threshold });
    const data = await call(`/api/review/count?${query}`).catch(() => null);
    if (mine !== asked || !data) return; // a later change answers instead
    output.dataset.count = data.count;
    output.textContent = data.count ? `${data.count} would be accepted`
      : `none would be accepted: no open proposal in this view reaches ${threshold}${data.highest === null ? "" : ` (the highest is ${data.highest.toFixed(3)})`}`;
    button.disabled = !data.count;
  }
  form.threshold.addEventListener("input", count);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const threshold = parseFloat(form.threshold.value);
    const reply = await post("/api/review/accept-above", { ...view(), threshold, snapshot: parseInt(form.dataset.snapshot, 10) });
    document.querySelectorAll("#proposals .card.state-open").forEach((c) => { if (parseFloat(c.dataset.confidence) >= threshold) reviewed(c, "accepted"); });
    status(reply.message || `${reply.accepted} proposals accepted${reply.skipped ? `, ${reply.skipped} left as they were (labelled meanwhile)` : ""}`);
    count();
  });
}

// The proposals being computed: the count goes up; the page reloads when they are ready (or says so).
function watchProgress(notice) {
  const received = notice.querySelector(".progress-received");
  const timer = setInterval(async () => {
    const data = await call("/api/review/progress").catch(() => null);
    if (!data) return;
    received.textContent = data.received;
    if (data.computing) return;
    clearInterval(timer);
    if (data.error) notice.textContent = `could not compute the proposals: ${data.error}`;
    else if (notice.dataset.reload === "true") window.location.reload();
    else notice.textContent = "new proposals are ready: reload the page to see them";
  }, 700);
}

function setUpRecompute(button) {
  button.addEventListener("click", async () => {
    button.disabled = true;
    const data = await post("/api/review/recompute", {});
    const notice = button.closest("p");
    notice.dataset.reload = "true";
    notice.innerHTML = "";
    notice.append("computing the proposals: ", Object.assign(document.createElement("span"), { className: "progress-received", textContent: data.received }), ` of about ${data.expected}`);
    watchProgress(notice);
  });
}

// -- search page ---------------------------------------------------------------------------------
function setUpSearchPage(form) {
  const input = form.querySelector("input[type=file]");
  form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("over"); });
  form.addEventListener("dragleave", () => form.classList.remove("over"));
  form.addEventListener("drop", (e) => { e.preventDefault(); input.files = e.dataTransfer.files; form.submit(); });
  const results = document.getElementById("results");
  const button = document.getElementById("label-selected");
  if (!results || !button) return;
  const selection = setUpSelection(results);
  button.addEventListener("click", async () => {
    const label = document.getElementById("relabel-as").value.trim();
    const cards = selection.cards();
    if (!label || !cards.length) { status("select some results and type a label first"); return; }
    const n = await postInChunks("/api/labels", cards, (chunk) => labelsOf(chunk, () => label));
    cards.forEach((c) => setState(c, "labelled", `labelled ${label}`));
    selection.clear();
    status(`${n} labelled ${label}`);
  });
}

// -- duplicates page: keep the chosen item of a group, delete the others (two clicks) ------------------
function setUpDuplicatesPage() {
  document.querySelectorAll(".dup-group .keep-one").forEach((button) => {
    const group = button.closest(".dup-group");
    let disarm = null;
    button.addEventListener("click", async () => {
      const keep = group.querySelector("input[type=radio]:checked").value;
      const others = [...group.querySelectorAll(".dup-item")].filter((item) => item.dataset.id !== keep);
      if (!button.classList.contains("armed")) {
        button.classList.add("armed");
        button.textContent = `click again to delete ${others.length} (keeps ${keep})`;
        disarm = setTimeout(() => { button.classList.remove("armed"); button.textContent = "delete the others"; }, 5000);
        return;
      }
      clearTimeout(disarm);
      button.disabled = true;
      const reply = await post("/api/delete", { ids: others.map((item) => item.dataset.id) });
      others.forEach((item) => item.classList.add("deleted"));
      group.classList.add("resolved");
      group.querySelector(".group-state").textContent = `kept ${keep}, deleted ${reply.deleted}`;
      button.remove();
      status(`group: kept ${keep}, deleted ${reply.deleted}`);
    });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const queue = document.getElementById("queue");
  if (queue) setUpLabelPage(queue);
  const proposals = document.getElementById("proposals");
  if (proposals) setUpReviewPage(proposals);
  const progress = document.getElementById("review-progress");
  if (progress) watchProgress(progress);
  const recompute = document.getElementById("recompute");
  if (recompute) setUpRecompute(recompute);
  const upload = document.getElementById("upload-form");
  if (upload) setUpSearchPage(upload);
  if (document.querySelector(".dup-group")) setUpDuplicatesPage();
});

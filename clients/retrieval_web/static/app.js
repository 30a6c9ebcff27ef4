// Writes go to the JSON endpoints, with the session's CSRF token (from the page's meta tag) in a
// header; keyboard shortcuts on the Label page; drag and drop on Search. No inline script: the
// content security policy runs only this file.
"use strict";

const CHUNK = 5000; // ids per write (the page takes at most 10,000)

function status(text) { document.getElementById("status").textContent = text; }

function csrfToken() { return document.querySelector('meta[name="csrf-token"]').content; }

async function post(url, body) {
  const reply = await fetch(url, {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
    body: JSON.stringify(body),
  });
  const data = await reply.json().catch(() => ({ error: reply.status, message: reply.statusText }));
  if (!reply.ok) { status(`${data.error}: ${data.message}`); throw new Error(data.message); }
  return data;
}

function done(card, text) { card.classList.add("done"); card.classList.remove("selected"); card.dataset.done = text; status(text); }

function selectNext(card) {
  const next = [...document.querySelectorAll("#queue .card")].find((c) => !c.classList.contains("done") && c !== card);
  document.querySelectorAll("#queue .card.selected").forEach((c) => c.classList.remove("selected"));
  if (next) { next.classList.add("selected"); next.focus(); }
}

async function labelCard(card, label) {
  if (!label) return;
  await post("/api/labels", { labels: { [card.dataset.id]: label } });
  done(card, `${card.dataset.id}: ${label}`);
  selectNext(card);
}

function setUpLabelPage(queue) {
  const labels = JSON.parse(queue.dataset.labels);
  queue.addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    if (!card) return;
    if (e.target.classList.contains("set-label")) { labelCard(card, e.target.dataset.label); return; }
    if (e.target.classList.contains("set-new-label")) { labelCard(card, card.querySelector(".new-label").value.trim()); return; }
    if (!e.target.closest("a")) { queue.querySelectorAll(".selected").forEach((c) => c.classList.remove("selected")); card.classList.add("selected"); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT") { if (e.key === "Enter") labelCard(e.target.closest(".card"), e.target.value.trim()); return; }
    const card = queue.querySelector(".card.selected");
    if (!card) return;
    const n = parseInt(e.key, 10);
    if (n >= 1 && n <= labels.length) { labelCard(card, labels[n - 1]); e.preventDefault(); }
    else if (e.key === "ArrowRight") { done(card, `${card.dataset.id}: skipped`); selectNext(card); }
  });
}

function setUpReviewPage() {
  document.querySelectorAll(".group .card").forEach((card) => {
    const act = (selector, fn) => { const el = card.querySelector(selector); if (el) el.addEventListener(el.tagName === "SELECT" ? "change" : "click", fn); };
    act(".accept", () => post("/api/labels", { labels: { [card.dataset.id]: card.dataset.label } }).then(() => done(card, `${card.dataset.id}: ${card.dataset.label}`)));
    act(".reject", () => post("/api/reject", { ids: [card.dataset.id] }).then(() => done(card, `${card.dataset.id}: rejected`)));
    act(".relabel", (e) => post("/api/labels", { labels: { [card.dataset.id]: e.target.value } }).then(() => done(card, `${card.dataset.id}: ${e.target.value}`)));
  });
  const form = document.getElementById("accept-above");
  if (form) form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const threshold = parseFloat(form.threshold.value);
    const cards = [...document.querySelectorAll(".group .card")].filter((c) => !c.dataset.done && parseFloat(c.dataset.confidence) >= threshold);
    let updated = 0;
    for (let start = 0; start < cards.length; start += CHUNK) {
      const chunk = cards.slice(start, start + CHUNK);
      const reply = await post("/api/labels", { labels: Object.fromEntries(chunk.map((c) => [c.dataset.id, c.dataset.label])) });
      chunk.forEach((c) => done(c, ""));
      updated += reply.updated;
    }
    status(`${updated} proposals accepted`);
  });
}

function setUpSearchPage(form) {
  const input = form.querySelector("input[type=file]");
  form.addEventListener("dragover", (e) => { e.preventDefault(); form.classList.add("over"); });
  form.addEventListener("dragleave", () => form.classList.remove("over"));
  form.addEventListener("drop", (e) => { e.preventDefault(); input.files = e.dataTransfer.files; form.submit(); });
}

document.addEventListener("DOMContentLoaded", () => {
  const queue = document.getElementById("queue");
  if (queue) setUpLabelPage(queue);
  if (document.querySelector(".group .card")) setUpReviewPage();
  const upload = document.getElementById("upload-form");
  if (upload) setUpSearchPage(upload);
});

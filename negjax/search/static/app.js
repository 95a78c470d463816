// The search page: asks /api/search and draws one column of thumbnails per model.
"use strict";

const form = document.getElementById("search-form");
const results = document.getElementById("results");
const notes = document.getElementById("notes");

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function draw(data) {
  results.replaceChildren();
  notes.textContent = data.notes.join(" ");
  for (const column of data.columns) {
    const section = element("section", "column");
    section.append(element("h2", "model", `${column.name} [${column.checkpoint}]`));
    const grid = element("ol", "grid");
    for (const r of column.results) {
      const card = element("li", "card");
      const img = element("img");
      img.src = r.url;
      img.alt = r.path;
      img.title = r.path;
      card.append(img, element("span", "score", r.score.toFixed(3)),
                  element("span", "path", r.path));
      grid.append(card);
    }
    section.append(grid);
    results.append(section);
  }
  document.body.dataset.state = "done";
}

async function search() {
  const q = document.getElementById("query").value;
  if (!q.trim()) return;
  document.body.dataset.state = "searching";
  const params = new URLSearchParams({
    q,
    baseline: form.querySelector("input[name=baseline]:checked").value,
    alpha: document.getElementById("alpha").value,
  });
  const response = await fetch(`/api/search?${params}`);
  const data = await response.json();
  if (!response.ok) {
    results.replaceChildren();
    notes.textContent = `error: ${data.error}`;
    document.body.dataset.state = "error";
    return;
  }
  draw(data);
}

form.addEventListener("submit", (event) => { event.preventDefault(); search(); });
for (const radio of form.querySelectorAll("input[name=baseline]")) {
  radio.addEventListener("change", search);  // the baseline is a toggle: redraw at once
}

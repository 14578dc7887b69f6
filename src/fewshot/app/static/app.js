// fewshot app: the page. Plain JavaScript, no library, nothing fetched from the internet.
// The server holds the state (classes, images, the adapted model); the page shows it and
// sends what the user does. document.body.dataset counts finished actions (actionCount,
// adaptCount, predictCount, uploadCount, errorCount) so that tests and benchmarks know when
// the page is done.
"use strict";

const page = { state: null, predictions: new Map(), busy: false };
const $ = (selector, root = document) => root.querySelector(selector);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.dataset[key.slice(5).replace(/-(.)/g, (_, c) => c.toUpperCase())] = value;
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function bump(counter) {
  document.body.dataset[counter] = String(Number(document.body.dataset[counter] || 0) + 1);
}

// --- Talking to the server ------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { "X-Requested-With": "fewshot-app", ...(options.headers || {}) };
  let body = options.body;
  if (options.json !== undefined) {
    body = JSON.stringify(options.json);
    headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(path, { method: options.method || "GET", headers, body });
  } catch (error) {
    throw new Error("the server did not answer (is fewshot app still running?)");
  }
  let value = null;
  try { value = await response.json(); } catch (error) { value = null; }
  if (!response.ok) {
    throw new Error((value && value.error) || `the server answered ${response.status} ${response.statusText}`);
  }
  return value;
}

function showMessage(text, kind = "error") {
  const box = $("#messages");
  const close = element("button", { type: "button", title: "dismiss", textContent: "×" });
  const message = element("div", { class: `message ${kind}` }, element("span", { textContent: text }), close);
  close.addEventListener("click", () => message.remove());
  box.prepend(message);
  while (box.children.length > 8) box.lastElementChild.remove();
  if (kind === "error") bump("errorCount");
}

function setBusy(text, value = null, max = null) {
  const progress = $("#progress");
  page.busy = text !== null;
  progress.hidden = !page.busy;
  if (value === null) progress.removeAttribute("value"); else { progress.max = max; progress.value = value; }
  if (text !== null) $("#status").textContent = text;
  $("#adapt").disabled = page.busy;
}

async function refresh() {
  page.state = await api("/api/state");
  render();
}

// --- Drawing the page -----------------------------------------------------------------------

function render() {
  const state = page.state;
  renderModel(state.model);
  const classes = $("#classes");
  classes.replaceChildren(...state.classes.map(renderClass));
  const adapted = state.adapted;
  const current = adapted && !adapted.stale;
  $("#download").hidden = !current;
  $("#predictions").classList.toggle("stale", Boolean(adapted && adapted.stale));
  if (adapted && adapted.stale && !page.busy) {
    $("#status").textContent = "The classes changed since the model adapted: press Adapt again.";
  }
  renderQueries();
}

function renderModel(model) {
  const rows = [["model", model.name], ["trained on", `${model.dataset}, ${model.ways}-way ${model.shots || "?"}-shot`],
                ["algorithm", `${model.algorithm} (${model.backbone})`], ["test accuracy", model.accuracy],
                ["images", model.images], ["adaptation", model.adaptation], ["batch norm", model.batch_norm]];
  $("#model").replaceChildren(...rows.flatMap(([key, value]) => [
    element("dt", { textContent: key }), element("dd", { textContent: value, "data-field": key })]));
}

function thumbnail(image, deletable) {
  const thumb = element("div", { class: "thumb", "data-image-id": image.id },
    element("img", { src: `/api/images/${image.id}`, alt: image.name, title: image.name }));
  if (deletable) {
    const remove = element("button", { type: "button", class: "delete-image", title: `remove ${image.name}`, textContent: "×" });
    remove.addEventListener("click", () => act(() => api(`/api/images/${image.id}`, { method: "DELETE" })));
    thumb.append(remove);
  }
  return thumb;
}

function renderClass(imageClass) {
  const name = element("input", { class: "class-name", value: imageClass.name, title: "rename", "aria-label": "class name" });
  name.addEventListener("change", () => act(() => api(`/api/classes/${imageClass.id}`,
    { method: "PATCH", json: { name: name.value } })));
  name.addEventListener("keydown", (event) => { if (event.key === "Enter") name.blur(); });
  const remove = element("button", { type: "button", class: "delete-class", textContent: "Delete" });
  remove.addEventListener("click", () => act(() => api(`/api/classes/${imageClass.id}`, { method: "DELETE" })));
  const count = imageClass.images.length;
  const picker = element("input", { type: "file", multiple: true, class: "class-files" });
  picker.addEventListener("change", () => uploadAll(`/api/classes/${imageClass.id}/images`, picker.files));
  const card = element("div", { class: "class-card drop", "data-class-id": imageClass.id },
    name,
    element("div", { class: "class-head" },
      element("span", { class: "count", textContent: `${count} image${count === 1 ? "" : "s"}` }), remove),
    element("div", { class: "thumbs" }, ...imageClass.images.map((image) => thumbnail(image, true))),
    element("label", { class: "pick" }, "+ add images", picker));
  acceptDrops(card, `/api/classes/${imageClass.id}/images`);
  return card;
}

function percent(p) { return `${(100 * p).toFixed(1)}%`; }

function renderQueries() {
  const rows = page.state.queries.map((query) => {
    const prediction = page.predictions.get(query.id);
    const card = element("div", { class: "prediction", "data-image-id": query.id },
      element("img", { src: `/api/images/${query.id}`, alt: query.name }),
      element("div", { class: "query-name", textContent: query.name, title: query.name }));
    if (!prediction) {
      card.append(element("div", { class: "verdict pending", textContent: "not classified yet" }));
      return card;
    }
    card.append(element("div", { class: "verdict" },
      element("span", { class: "label", textContent: prediction.label }),
      element("span", { class: "probability", textContent: percent(prediction.probability),
                        "data-probability": String(prediction.probability) })));
    const bars = element("div", { class: "bars" });
    for (const best of prediction.top) {
      const fill = element("span", { class: "bar-fill" });
      fill.style.width = percent(best.probability);
      bars.append(element("div", { class: "bar", "data-class": best.class, "data-probability": String(best.probability) },
        element("span", { class: "bar-label", textContent: best.class, title: best.class }),
        element("span", { class: "bar-track" }, fill),
        element("span", { class: "bar-value", textContent: percent(best.probability) })));
    }
    card.append(bars);
    return card;
  });
  $("#predictions").replaceChildren(...rows);
}

// --- Actions --------------------------------------------------------------------------------

async function act(action) {
  try { await action(); } catch (error) { showMessage(error.message); }
  try { await refresh(); } catch (error) { showMessage(error.message); }
  bump("actionCount");
}

async function uploadAll(url, fileList) {
  const files = Array.from(fileList || []);
  if (!files.length) {  // a drop of something that is not a file (text, a link)
    bump("uploadCount");
    return;
  }
  let added = 0;
  const failures = [];
  // One at a time, in the order given: the page keeps the order of its images, and a big drop
  // does not open hundreds of connections at once.
  for (const [index, file] of files.entries()) {
    setBusy(`Uploading ${index + 1} of ${files.length}: ${file.name}`, index, files.length);
    try {
      await api(url, { method: "POST", body: file, headers: { "X-File-Name": encodeURIComponent(file.name) } });
      added += 1;
    } catch (error) {
      failures.push(`${file.name}: ${error.message}`);
      // The first few refusals each get a message; the rest are summed up below.
      if (failures.length <= 5) showMessage(failures[failures.length - 1]);
    }
  }
  if (failures.length > 5) {
    showMessage(`${failures.length - 5} more file(s) were not added; the last: ${failures[failures.length - 1]}`);
  }
  setBusy(null);
  $("#status").textContent = `Added ${added} of ${files.length} file${files.length === 1 ? "" : "s"}.`;
  try { await refresh(); } catch (error) { showMessage(error.message); }
  bump("uploadCount");
  const adapted = page.state && page.state.adapted;
  if (url === "/api/queries" && adapted && !adapted.stale) await predict();
}

function acceptDrops(zone, url) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    uploadAll(url, event.dataTransfer && event.dataTransfer.files);
  });
}

function showPredictions(result) {
  page.predictions = new Map(result.predictions.map((row) => [row.id, row]));
  $("#batching").textContent = result.batching ? `Batch norm: ${result.batching}` : "";
}

async function adapt(event) {
  const start = event ? event.timeStamp : performance.now();
  setBusy("Adapting…");
  try {
    const result = await api("/api/adapt", { method: "POST", json: { one_at_a_time: $("#one-at-a-time").checked } });
    showPredictions(result);
    page.state = await api("/api/state");
    render();
    // Wait for the browser to lay out and paint the predictions before stopping the clock.
    await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
    const milliseconds = performance.now() - start;
    document.body.dataset.adaptMs = milliseconds.toFixed(1);
    const adapted = result.adapted;
    document.body.dataset.serverMs = (1000 * (adapted.seconds + result.seconds)).toFixed(1);
    setBusy(null);
    $("#status").textContent = `Adapted to ${adapted.classes.length} classes ` +
      `(${adapted.classes.reduce((n, c) => n + c.images, 0)} images, ${adapted.steps} steps) and ` +
      `classified ${result.predictions.length} image(s) in ${milliseconds.toFixed(0)} ms.`;
  } catch (error) {
    setBusy(null);
    $("#status").textContent = "";
    showMessage(error.message);
  }
  bump("adaptCount");
}

async function predict() {
  setBusy("Classifying…");
  try {
    showPredictions(await api("/api/predict", { method: "POST", json: { one_at_a_time: $("#one-at-a-time").checked } }));
    renderQueries();
    setBusy(null);
    $("#status").textContent = `Classified ${page.predictions.size} image(s).`;
  } catch (error) {
    setBusy(null);
    showMessage(error.message);
  }
  bump("predictCount");
}

function start() {
  $("#add-class").addEventListener("click", () => act(() => api("/api/classes", { method: "POST", json: {} })));
  $("#adapt").addEventListener("click", adapt);
  $("#query-files").addEventListener("change", (event) => {
    const files = Array.from(event.target.files);
    event.target.value = "";  // so that picking the same files again adds them again
    uploadAll("/api/queries", files);
  });
  $("#clear-queries").addEventListener("click", () => act(async () => {
    await api("/api/queries", { method: "DELETE" });
    page.predictions = new Map();
    $("#batching").textContent = "";
  }));
  $("#one-at-a-time").addEventListener("change", () => {
    const adapted = page.state && page.state.adapted;
    if (adapted && !adapted.stale && page.state.queries.length) predict();
  });
  acceptDrops($("#query-drop"), "/api/queries");
  // A file dropped beside a drop zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  refresh().then(() => { document.body.dataset.ready = "1"; },
                 (error) => showMessage(error.message));
}

start();

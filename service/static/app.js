// The page calls the same API any client does: POST predict, then POST explain.
"use strict";

const $ = (id) => document.getElementById(id);

function headersFor() {
  const headers = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

// One call; resolves to {body, timing} or throws an Error whose message is the API's, in words.
async function call(route, payload) {
  let response;
  try {
    response = await fetch(route, { method: "POST", headers: headersFor(), body: JSON.stringify(payload) });
  } catch (err) {
    throw new Error(`The service could not be reached (${err.message}).`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    if (response.status === 401) showKeyField();
    const error = new Error(whatToDo(response.status, body || {}));
    error.status = response.status;
    throw error;
  }
  const timing = ["tokenization", "queue", "inference", "total"]
    .map((name) => [name, response.headers.get(`x-${name}-time`)])
    .filter(([, value]) => value !== null)
    .map(([name, value]) => `${name} ${Number(value).toFixed(1)} ms`)
    .join(", ");
  return { body, timing };
}

// An error as what the reader can do about it, in the page's terms (its boxes, not the API's
// fields); the API's own words only where they name what to fix in the text itself.
function whatToDo(status, body) {
  const kind = body.error_type ? ` (${body.error_type})` : "";
  if (body.error_type === "input_too_long") {
    const counts = /has (\d+) tokens; the model reads at most (\d+)/.exec(body.error || "");
    const size = counts ? `This review has ${counts[1]} tokens; the model reads at most ${counts[2]}. ` : "This review is longer than the model reads. ";
    return `${size}Tick “Truncate long reviews” to score its start and end, or shorten it.${kind}`;
  }
  const words = {
    401: "Enter the API key this server asks for in the “API key” box, then Analyse again.",
    413: "This review is larger than the service accepts: shorten it.",
    429: "The service is busy: try again in a moment.",
    503: "The model is still loading: try again in a moment.",
    504: "The service took too long to answer: try again, or a shorter review.",
  }[status];
  if (words) return `${words}${kind}`;
  const detail = body.error ? ` ${body.error}` : "";
  return `The review was refused:${detail}${kind}`;
}

function showKeyField() {
  $("key-field").hidden = false;
}

// The served model's name and version under the title; a 401 here means the server asks for
// a key, so the key box appears (it stays hidden where there is no authentication).
async function showModel() {
  let response;
  try {
    response = await fetch("info", { headers: headersFor() });
  } catch (err) {
    return;
  }
  if (response.status === 401) {
    showKeyField();
    $("model-version").textContent = "This server asks for an API key.";
    return;
  }
  if (!response.ok) return;
  const { model } = await response.json();
  $("model-version").textContent = `Model ${model.name} ${model.version}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function percent(score) {
  return `${(100 * score).toFixed(1)}%`;
}

function showVerdict(scores, timing) {
  const best = scores[0];
  const positive = scores.find((s) => s.label === "POSITIVE").score;
  $("label").textContent = best.label;
  $("label").className = best.label;
  $("score").textContent = percent(best.score);
  $("gauge").setAttribute("aria-valuenow", (100 * positive).toFixed(1));
  $("gauge").setAttribute("aria-valuetext", `${percent(positive)} positive`);
  $("gauge-fill").style.left = `calc(${(100 * positive).toFixed(2)}% - 2px)`;
  $("timing").textContent = `Prediction: ${timing}`;
  $("result").hidden = false;
}

// Offsets are Unicode code points (as Python counts); Array.from splits a string the same way.
function showExplanation(text, explained, timing) {
  const chars = Array.from(text);
  const slice = (a, b) => chars.slice(a, b).join("");
  const scale = Math.max(1e-9, ...explained.tokens.map((t) => Math.abs(t.attribution)));
  const out = $("tokens");
  out.replaceChildren();
  const dropped = explained.dropped_tokens;
  let at = 0;
  for (const token of explained.tokens) {
    if (dropped && at <= dropped.text_start && token.start >= dropped.text_end) {
      // The tokens truncation dropped: not listed, struck through as one stretch of text.
      out.append(slice(at, dropped.text_start));
      const gap = document.createElement("span");
      gap.className = "tok dropped";
      gap.title = "not read: truncation dropped it";
      gap.textContent = slice(dropped.text_start, dropped.text_end);
      out.append(gap);
      at = dropped.text_end;
    }
    out.append(slice(at, token.start));
    const span = document.createElement("span");
    span.className = "tok";
    span.textContent = slice(token.start, token.end);
    const strength = Math.abs(token.attribution) / scale;
    const rgb = token.attribution >= 0 ? "var(--positive)" : "var(--negative)";
    span.style.backgroundColor = `rgba(${rgb}, ${strength.toFixed(3)})`;
    if (strength > 0.55) span.style.color = "#fff";
    span.dataset.attribution = token.attribution.toFixed(4);
    span.title = `${token.attribution >= 0 ? "+" : ""}${token.attribution.toFixed(3)} towards positive`;
    out.append(span);
    at = token.end;
  }
  out.append(slice(at, chars.length));

  const note = $("dropped");
  if (dropped) {
    const { start, end } = dropped;
    note.textContent = `The model reads at most its first and last tokens: tokens ${start + 1} to ${end} (struck through) were not read.`;
    note.hidden = false;
  } else {
    note.hidden = true;
  }

  const list = $("sentences");
  list.replaceChildren();
  for (const sentence of explained.sentences) {
    const item = document.createElement("li");
    const verdict = document.createElement("span");
    verdict.className = sentence.label;
    verdict.textContent = `${sentence.label} ${percent(sentence.score)}`;
    item.append(verdict, " ", slice(sentence.start, sentence.end));
    list.append(item);
  }
  $("mixed").hidden = !explained.mixed;
  const gap = explained.completeness.gap;
  $("explain-status").textContent = `Integrated gradients, ${explained.steps} steps (completeness gap ${gap.toFixed(3)}).`;
  $("explain-timing").textContent = `Explanation: ${timing}`;
}

async function analyse(event) {
  event.preventDefault();
  const text = $("text").value;
  const payload = { inputs: text, truncate: $("truncate").checked };
  $("error").hidden = true;
  $("result").hidden = true;
  $("explanation").hidden = true;
  $("submit").disabled = true;
  try {
    const predicted = await call("predict", payload);
    showVerdict(predicted.body[0], predicted.timing);
    $("explanation").hidden = false;
    $("explain-status").textContent = "Explaining…";
    $("tokens").replaceChildren();
    $("sentences").replaceChildren();
    $("explain-timing").textContent = "";
    const explained = await call("explain", payload);
    showExplanation(text, explained.body[0], explained.timing);
  } catch (err) {
    showError(err.message);
    if (!$("explanation").hidden) $("explain-status").textContent = "No explanation: see the message above.";
  } finally {
    $("submit").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", analyse);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
  for (const button of document.querySelectorAll("[data-example]")) {
    button.addEventListener("click", () => {
      $("text").value = button.dataset.example;
      $("text").focus();
    });
  }
  // Remember the key for this tab only.
  $("apikey").value = sessionStorage.getItem("sentiment-api-key") || "";
  $("apikey").addEventListener("change", () => {
    sessionStorage.setItem("sentiment-api-key", $("apikey").value);
    showModel();
  });
  showModel();
});

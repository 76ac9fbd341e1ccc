// The little JavaScript the dashboard needs; htmx and its SSE extension do the rest.
(function () {
  "use strict";

  // Relative times ("3 s ago") stay current; the absolute time is the title.
  function relative(date) {
    var seconds = Math.round((Date.now() - date.getTime()) / 1000);
    var abs = Math.abs(seconds);
    if (abs < 1) return "just now";
    var text;
    if (abs < 60) text = abs + " s";
    else if (abs < 3600) text = Math.floor(abs / 60) + " min";
    else if (abs < 86400) text = Math.floor(abs / 3600) + " h";
    else text = Math.floor(abs / 86400) + " d";
    return seconds > 0 ? text + " ago" : "in " + text;
  }
  function refreshTimes(root) {
    (root || document).querySelectorAll("time[data-relative]").forEach(function (el) {
      el.textContent = relative(new Date(el.getAttribute("datetime")));
    });
  }
  setInterval(refreshTimes, 5000);

  // The stream's cursor. A reconnecting EventSource sends Last-Event-ID by
  // itself, but when it gives up, htmx opens a new one from the sse-connect
  // URL (htmx-extensions#184): keep that URL's ?after= at the last event seen.
  // (Before the swap: an element replaced by outerHTML no longer bubbles.)
  document.addEventListener("htmx:sseBeforeMessage", function (evt) {
    var id = evt.detail && evt.detail.lastEventId;
    var source = document.querySelector("[sse-connect]");
    if (!id || !source) return;
    var url = new URL(source.getAttribute("sse-connect"), location.href);
    url.searchParams.set("after", id);
    source.setAttribute("sse-connect", url.pathname + url.search);
  });

  // A job's streamed text and log lines arrive as job.output / job.log events
  // (JSON, not HTML): append each at its place, ignoring what the page already
  // shows (a replay after a reconnection overlaps), starting over for a new attempt.
  // Offsets count code points, as the server does.
  function newAttempt(el, attempt) {
    var current = +el.dataset.attempt || 0;
    if (attempt < current) return null;
    var panel = el.closest(".panel");
    if (attempt > current) {
      el.dataset.attempt = attempt;
      el.textContent = "";
      el.dataset.length = el.dataset.next = "0";
      panel.querySelectorAll("[data-attempt-label]").forEach(function (label) {
        label.textContent = "attempt " + attempt;
      });
    }
    return panel;
  }
  function follow(el, apply) {
    var atBottom = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
    apply();
    el.closest(".panel").hidden = false;
    if (atBottom) el.scrollTop = el.scrollHeight;
  }
  function appendOutput(el, data) {
    if (!newAttempt(el, data.attempt)) return;
    var length = +el.dataset.length || 0;
    var text = Array.from(data.text);
    if (data.offset > length || data.offset + text.length <= length) return;  // a gap (never sent) or already shown
    var fresh = text.slice(length - data.offset);
    follow(el, function () { el.append(fresh.join("")); });
    el.dataset.length = length + fresh.length;
  }
  function appendLogs(el, data) {
    if (!newAttempt(el, data.attempt)) return;
    var next = +el.dataset.next || 0;
    follow(el, function () {
      data.lines.forEach(function (line, i) {
        if (data.first + i < next) return;
        var item = document.createElement("li");
        item.textContent = line;
        el.appendChild(item);
      });
      while (el.children.length > 1000) el.removeChild(el.firstChild);
    });
    el.dataset.next = Math.max(next, data.first + data.lines.length);
  }
  document.addEventListener("htmx:sseBeforeMessage", function (evt) {
    var el = evt.target;
    var apply = el.matches("[data-live-output]") ? appendOutput : el.matches("[data-live-logs]") ? appendLogs : null;
    if (!apply) return;
    evt.preventDefault();  // not an HTML fragment to swap
    apply(el, JSON.parse(evt.detail.data));
  });

  // Copy buttons: the text of the element they name.
  document.addEventListener("click", function (evt) {
    var button = evt.target.closest("button[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.dataset.copy);
    if (!source) return;
    var text = source.matches("ol") ? Array.from(source.children).map(function (li) { return li.textContent; }).join("\n") : source.textContent;
    navigator.clipboard.writeText(text).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  });

  function setLive(state) {
    var el = document.getElementById("live");
    if (!el) return;
    el.className = "live " + state;
    el.textContent = state === "on" ? "live" : "reconnecting…";
  }
  document.addEventListener("htmx:sseOpen", function () { setLive("on"); });
  document.addEventListener("htmx:sseError", function () { setLive("off"); });

  // Dead-letter selections survive the live re-rendering of the list.
  var selected = new Set();
  document.addEventListener("change", function (evt) {
    var box = evt.target;
    if (box.matches("input[data-select-all]")) {
      box.closest("table").querySelectorAll("input[name=ids]").forEach(function (other) {
        other.checked = box.checked;
        if (box.checked) selected.add(other.value); else selected.delete(other.value);
      });
    } else if (box.matches("#dead-letter input[name=ids]")) {
      if (box.checked) selected.add(box.value); else selected.delete(box.value);
    }
  });
  document.addEventListener("htmx:afterRequest", function (evt) {
    if (!evt.detail.elt || evt.detail.elt.id !== "dead-letter-form") return;
    selected.clear();  // acted upon
    document.querySelectorAll("#dead-letter input[type=checkbox]").forEach(function (box) { box.checked = false; });
  });
  document.addEventListener("htmx:afterSettle", function (evt) {
    document.querySelectorAll("#dead-letter input[name=ids]").forEach(function (box) {
      box.checked = selected.has(box.value);
    });
    refreshTimes(evt.target);
  });
})();

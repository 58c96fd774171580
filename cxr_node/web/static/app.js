// cxr-node console: the little JavaScript it has. Everything works without it.
(function () {
  "use strict";
  // probability bars: width from data-p (inline styles are not allowed by the page's CSP)
  function bars(root) {
    root.querySelectorAll(".bar[data-p]").forEach(function (b) {
      b.style.width = Math.round(parseFloat(b.dataset.p) * 120) + "px";
    });
  }
  // the worklist refreshes its table every 20 s (the filters stay as they are)
  function refresh() {
    var box = document.getElementById("worklist");
    if (!box || document.hidden) return;
    fetch(box.dataset.refresh, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (r) {
        if (r.redirected || !r.ok) { window.location.reload(); return null; }
        return r.text();
      })
      .then(function (html) { if (html !== null && html !== undefined) { box.innerHTML = html; bars(box); } })
      .catch(function () { /* offline for a moment: try again next time */ });
  }
  // a worklist row opens its study (the patient's name is also a plain link)
  document.addEventListener("click", function (e) {
    var row = e.target.closest && e.target.closest("tr[data-href]");
    if (!row || e.target.closest("a, button, input, select")) return;
    window.location.href = row.dataset.href;
  });
  // the study page: overlay on/off (swaps the picture for the original film and back)
  document.addEventListener("click", function (e) {
    var b = e.target.closest && e.target.closest("button.toggle-overlay");
    if (!b) return;
    var img = document.getElementById(b.dataset.target);
    var full = document.getElementById(b.dataset.target + "-full");
    var showingOverlay = img.dataset.showing !== "film";
    img.src = showingOverlay ? img.dataset.film : img.dataset.overlay;
    if (full) full.href = (showingOverlay ? img.dataset.film : img.dataset.overlay) + "?size=full";
    img.dataset.showing = showingOverlay ? "film" : "overlay";
    b.textContent = showingOverlay ? "Show overlay" : "Hide overlay";
    b.setAttribute("aria-pressed", showingOverlay ? "false" : "true");
  });
  // long UIDs: shortened on the page; a click copies the full value
  document.addEventListener("click", function (e) {
    var u = e.target.closest && e.target.closest("[data-copy]");
    if (!u || !navigator.clipboard) return;
    navigator.clipboard.writeText(u.dataset.copy).then(function () {
      u.classList.add("copied");
      window.setTimeout(function () { u.classList.remove("copied"); }, 1200);
    }, function () { /* no clipboard permission: the full value is in the tooltip */ });
  });
  document.addEventListener("DOMContentLoaded", function () {
    bars(document);
    if (document.getElementById("worklist")) window.setInterval(refresh, 20000);
  });
})();

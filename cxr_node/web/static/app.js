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
  document.addEventListener("DOMContentLoaded", function () {
    bars(document);
    if (document.getElementById("worklist")) window.setInterval(refresh, 20000);
  });
})();

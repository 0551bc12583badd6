// Periodic refresh of [data-refresh] regions: the region is fetched again from the
// same URL (filters included) and swapped in, unless the operator has checked a box
// or typed into a field inside it, and never while the tab is hidden.
(function () {
  "use strict";

  function regionIsBusy(region) {
    if (region.querySelector("input[type=checkbox]:checked")) return true;
    var active = document.activeElement;
    return Boolean(active && region.contains(active) && active.matches("input, select, textarea"));
  }

  function refresh(region) {
    if (document.hidden || regionIsBusy(region)) return;
    fetch(window.location.href, { headers: { "X-Requested-With": "fetch" }, credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById(region.id);
        if (fresh && !regionIsBusy(region)) region.replaceWith(fresh);
      })
      .catch(function () { /* keep the last content; the next tick retries */ });
  }

  function start() {
    document.querySelectorAll("[data-refresh]").forEach(function (region) {
      var seconds = Number(region.getAttribute("data-refresh")) || 5;
      window.setInterval(function () {
        var current = document.getElementById(region.id);
        if (current) refresh(current);
      }, seconds * 1000);
    });
    document.querySelectorAll("[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
      });
    });
    document.querySelectorAll("[data-select-all]").forEach(function (box) {
      box.addEventListener("change", function () {
        document.querySelectorAll("input[name=job_id]").forEach(function (item) {
          item.checked = box.checked;
        });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", start);
})();

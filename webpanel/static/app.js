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
  }

  // Delegated from the document, so forms inside a refreshed region keep their
  // confirmation after the region is replaced.
  document.addEventListener("submit", function (event) {
    var form = event.target.closest ? event.target.closest("form[data-confirm]") : null;
    if (form && !window.confirm(form.getAttribute("data-confirm"))) event.preventDefault();
  });

  document.addEventListener("DOMContentLoaded", start);
})();

// ---- Jobs: manual refresh with loading and error states, staleness notice, and
// select-all boxes that keep working after a region was swapped in. ----
(function () {
  "use strict";

  function statusFor(region) {
    var id = region.getAttribute("data-refresh-status");
    return id ? document.getElementById(id) : null;
  }

  function refreshNow(region) {
    var status = statusFor(region);
    region.classList.add("is-refreshing");
    region.setAttribute("aria-busy", "true");
    if (status) { status.textContent = "Refreshing…"; }
    fetch(window.location.href, { headers: { "X-Requested-With": "fetch" }, credentials: "same-origin" })
      .then(function (response) {
        return response.text().then(function (html) { return { ok: response.ok, code: response.status, html: html }; });
      })
      .then(function (answer) {
        var doc = new DOMParser().parseFromString(answer.html, "text/html");
        var fresh = doc.getElementById(region.id);
        if (answer.ok && fresh) {
          region.replaceWith(fresh);
          return;
        }
        throw new Error("HTTP " + answer.code);
      })
      .catch(function (error) {
        region.classList.remove("is-refreshing");
        region.removeAttribute("aria-busy");
        if (status) { status.textContent = "Refresh failed (" + error.message + "); the list below is older."; }
      });
  }

  function markStale() {
    document.querySelectorAll("[data-refresh][data-refresh-status]").forEach(function (region) {
      var stamp = region.querySelector(".refresh-note time[datetime]");
      var status = statusFor(region);
      if (!stamp || !status || document.hidden) return;
      if (region.querySelector("input[type=checkbox]:checked")) return;
      var seconds = Number(region.getAttribute("data-refresh")) || 5;
      var age = (Date.now() - Date.parse(stamp.getAttribute("datetime"))) / 1000;
      if (age > seconds * 3 && !status.textContent) {
        status.textContent = "Not updated for " + Math.round(age) + " s; the panel may be unreachable.";
      }
    });
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("[data-refresh-now]") : null;
    if (!link) return;
    var region = document.getElementById(link.getAttribute("data-refresh-now"));
    if (!region) return;
    event.preventDefault();
    refreshNow(region);
  });

  document.addEventListener("change", function (event) {
    var box = event.target;
    if (!box.matches || !box.matches("[data-select-all]")) return;
    var table = box.closest("table") || document;
    table.querySelectorAll("input[name=job_id]").forEach(function (item) { item.checked = box.checked; });
  });

  window.setInterval(markStale, 5000);
})();

// ---- Defer form: a body larger than the panel accepts is stopped in the browser.
// The server returns 413 before it reads the form, so the typed input would be
// lost. Here the form stays as it is, and a notice names the sizes. ----
(function () {
  "use strict";

  function describe(bytes) {
    if (bytes >= 1048576) return (bytes / 1048576).toFixed(1) + " MiB";
    return (bytes / 1024).toFixed(1) + " KiB";
  }

  document.addEventListener("submit", function (event) {
    var form = event.target.closest ? event.target.closest("form[data-max-bytes]") : null;
    if (!form) return;
    var limit = Number(form.getAttribute("data-max-bytes"));
    var argumentLimit = Number(form.getAttribute("data-argument-limit"));
    var encoder = new TextEncoder();
    var size = 0;
    form.querySelectorAll("textarea, input[type=text]").forEach(function (field) {
      size += encoder.encode(field.value).length;
    });
    var notice = document.getElementById(form.getAttribute("data-size-error"));
    if (!limit || size <= limit) {
      if (notice) notice.hidden = true;
      return;
    }
    event.preventDefault();
    if (notice) {
      notice.textContent = "The arguments are " + describe(size) + "; the limit for job " +
        "arguments is " + describe(argumentLimit) + " (MAX_ARGUMENTS_BYTES). Nothing was " +
        "sent: shorten the JSON body and submit again.";
      notice.hidden = false;
      notice.scrollIntoView();
    }
  });
})();

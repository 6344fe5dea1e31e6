// contactd's web console: live updates. The server sends an event named
// "change" on /events when anything a page shows may have changed; the
// page is then fetched again and its <div id="live"> swapped in, so forms
// outside it keep what is being typed. Without this script every page reads
// the same and is reloaded by hand. No inline script anywhere: the
// Content-Security-Policy allows this file only.
"use strict";
(function () {
  var live = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!live || !window.EventSource || !window.fetch || !window.DOMParser) {
    return;
  }
  var busy = false;
  var again = false;
  function say(text) {
    if (status) {
      status.textContent = text;
    }
  }
  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", redirect: "manual" })
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (text) {
        if (!text) {
          return;
        }
        var fresh = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        if (!fresh) {
          return;
        }
        // Folded outputs the operator opened stay open.
        var open = {};
        live.querySelectorAll("details[open]").forEach(function (d, i) {
          open[i] = true;
        });
        fresh.querySelectorAll("details").forEach(function (d, i) {
          if (open[i]) {
            d.open = true;
          }
        });
        live.replaceWith(fresh);
        live = fresh;
        say("Updated " + new Date().toLocaleTimeString());
      })
      .catch(function () {
        say("Update failed; reload the page");
      })
      .finally(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }
  var events = new EventSource("/events");
  events.addEventListener("change", refresh);
  events.addEventListener("open", function () {
    document.body.setAttribute("data-live", "on");
    say("Live");
  });
  events.addEventListener("error", function () {
    document.body.setAttribute("data-live", "off");
    say("Live updates paused; retrying");
  });
})();

/* celery_batches dashboard: live refresh of pages showing unfinished batches, and confirmations.
 * Elements marked [data-live] are replaced by their fresh copies from the same URL every
 * <body data-refresh> seconds while one of them says data-unfinished="true". */
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  var seconds = parseFloat(document.body.getAttribute("data-refresh") || "0");
  if (!(seconds > 0) || !window.fetch || !window.DOMParser) {
    return;
  }

  function unfinished() {
    var live = document.querySelectorAll("[data-live]");
    for (var i = 0; i < live.length; i++) {
      if (live[i].getAttribute("data-unfinished") === "true") {
        return true;
      }
    }
    return false;
  }

  function schedule() {
    if (unfinished()) {
      window.setTimeout(refresh, seconds * 1000);
    }
  }

  function refresh() {
    if (document.hidden) {
      return schedule();
    }
    window.fetch(window.location.href, {credentials: "same-origin", cache: "no-store",
                                        headers: {"X-Requested-With": "fetch"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-live]").forEach(function (element) {
          var replacement = element.id && fresh.getElementById(element.id);
          if (replacement) {
            element.replaceWith(document.adoptNode(replacement));
          }
        });
        document.body.setAttribute("data-refreshed", new Date().toISOString());
      })
      .catch(function () { /* the server is restarting or unreachable: try again later */ })
      .then(schedule);
  }

  schedule();
})();

// Keep the fleet table's status column current without reloading (one request a second).
(function () {
  "use strict";
  var table = document.getElementById("fleet");
  if (!table) { return; }
  function refresh() {
    fetch("/api/fleet", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        data.devices.forEach(function (d) {
          var row = table.querySelector('tr[data-device="' + CSS.escape(d.id) + '"]');
          if (!row) { return; }
          var badge = row.querySelector(".status");
          badge.textContent = d.status;
          badge.className = "status " + d.status;
          badge.dataset.status = d.status;
          row.querySelector(".gateway").textContent = d.gateway;
          row.querySelector(".transport").textContent = d.transport;
          row.querySelector(".last-seen").textContent =
            d.last_seen ? d.last_seen.slice(0, 19).replace("T", " ") + " UTC" : "";
        });
      })
      .catch(function () {});
  }
  setInterval(refresh, 1000);
})();

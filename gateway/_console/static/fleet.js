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
        });
      })
      .catch(function () {});
  }
  setInterval(refresh, 1000);
})();

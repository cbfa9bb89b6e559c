// Keep the fleet page current without reloading, and without work when nothing changed:
// every two seconds it asks for the same page and filter with the ETag of what it shows, and
// the console answers 304 (no body) until something on the page changed.
(function () {
  "use strict";
  var table = document.getElementById("fleet");
  if (!table) { return; }
  var body = table.tBodies[0];
  var etag = "";
  var query = "/api/fleet?q=" + encodeURIComponent(table.dataset.q || "") +
    "&status=" + encodeURIComponent(table.dataset.status || "") +
    "&page=" + encodeURIComponent(table.dataset.page || "1");
  function when(text) { return text ? text.slice(0, 19).replace("T", " ") + " UTC" : ""; }
  function cell(row, text, cls) {
    var td = document.createElement("td");
    if (cls) { td.className = cls; }
    td.textContent = text || "";
    row.appendChild(td);
    return td;
  }
  function render(data) {
    var rows = document.createDocumentFragment();
    data.devices.forEach(function (d) {
      var tr = document.createElement("tr");
      tr.dataset.device = d.id;
      var link = document.createElement("a");
      link.href = "/devices/" + encodeURIComponent(d.id);
      link.textContent = d.id;
      cell(tr, "").appendChild(link);
      cell(tr, d.type);
      cell(tr, d.region);
      var badge = document.createElement("span");
      badge.className = "status " + d.status;
      badge.dataset.status = d.status;
      badge.textContent = d.status;
      cell(tr, "").appendChild(badge);
      cell(tr, (d.serial || "").slice(0, 16), "mono");
      cell(tr, when(d.not_after));
      cell(tr, when(d.last_seen), "last-seen");
      cell(tr, d.gateway, "gateway");
      cell(tr, d.transport, "transport");
      cell(tr, when(d.last_escalation));
      rows.appendChild(tr);
    });
    if (!data.devices.length) {
      var empty = document.createElement("tr");
      var td = cell(empty, "No devices match.");
      td.colSpan = 10;
      rows.appendChild(empty);
    }
    body.replaceChildren(rows);
    Object.keys(data.counts).forEach(function (k) {
      var el = document.querySelector('[data-count="' + k + '"]');
      if (el) { el.textContent = String(data.counts[k]); }
    });
    var info = document.getElementById("page-info");
    if (info) {
      info.textContent = "page " + data.page + " of " + data.pages + " (" + data.matching + " matching)";
    }
  }
  function refresh() {
    var headers = etag ? {"If-None-Match": etag} : {};
    fetch(query, {credentials: "same-origin", cache: "no-store", headers: headers})
      .then(function (r) {
        if (r.status === 304 || !r.ok) { return null; }
        etag = r.headers.get("ETag") || "";
        return r.json();
      })
      .then(function (data) { if (data) { render(data); } })
      .catch(function () {});
  }
  refresh();
  setInterval(refresh, 2000);
})();

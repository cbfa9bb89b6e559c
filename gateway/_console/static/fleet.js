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
  function set(el, text) {
    text = text || "";
    if (el.textContent !== text) { el.textContent = text; }
  }
  // Rows are kept per device and updated in place, so what an operator is looking at (or has
  // selected) is not rebuilt every time one device's "last seen" moves.
  function newRow(d) {
    var tr = document.createElement("tr");
    tr.dataset.device = d.id;
    var link = document.createElement("a");
    link.href = "/devices/" + encodeURIComponent(d.id);
    link.textContent = d.id;
    cell(tr, "").appendChild(link);
    cell(tr, "", "type");
    cell(tr, "", "region");
    var badge = document.createElement("span");
    cell(tr, "").appendChild(badge);
    cell(tr, "", "mono");
    cell(tr, "", "not-after");
    cell(tr, "", "last-seen");
    cell(tr, "", "gateway");
    cell(tr, "", "transport");
    cell(tr, "", "last-escalation");
    return tr;
  }
  function update(tr, d) {
    var c = tr.cells;
    set(c[1], d.type);
    set(c[2], d.region);
    var badge = c[3].firstChild;
    if (badge.dataset.status !== d.status) {
      badge.className = "status " + d.status;
      badge.dataset.status = d.status;
      badge.textContent = d.status;
    }
    set(c[4], (d.serial || "").slice(0, 16));
    set(c[5], when(d.not_after));
    set(c[6], when(d.last_seen));
    set(c[7], d.gateway);
    set(c[8], d.transport);
    set(c[9], when(d.last_escalation));
  }
  function render(data) {
    var have = {};
    Array.prototype.forEach.call(body.rows, function (tr) {
      if (tr.dataset.device) { have[tr.dataset.device] = tr; }
    });
    var keep = [];
    data.devices.forEach(function (d) {
      var tr = Object.prototype.hasOwnProperty.call(have, d.id) ? have[d.id] : newRow(d);
      update(tr, d);
      keep.push(tr);
    });
    if (!keep.length) {
      var empty = document.createElement("tr");
      var td = cell(empty, "No devices match.");
      td.colSpan = 10;
      keep.push(empty);
    }
    // Drop what left the page, then put the rows in the page's order (moving, not rebuilding).
    Array.prototype.slice.call(body.rows).forEach(function (tr) {
      if (keep.indexOf(tr) < 0) { body.removeChild(tr); }
    });
    keep.forEach(function (tr, i) {
      if (body.rows[i] !== tr) { body.insertBefore(tr, body.rows[i] || null); }
    });
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

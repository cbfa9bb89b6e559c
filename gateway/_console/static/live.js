// Live detections: frames with their boxes drawn on a canvas, the core's answers, revocations
// and the gateway's figures, from one server-sent event stream.
(function () {
  "use strict";
  var tiles = document.getElementById("tiles");
  var colours = ["#f6ad55", "#68d391", "#63b3ed", "#fc8181", "#b794f4", "#f687b3"];

  function tile(device) {
    var id = "tile-" + device;
    var t = document.getElementById(id);
    if (t) { return t; }
    t = document.createElement("section");
    t.className = "tile";
    t.id = id;
    t.dataset.device = device;
    t.dataset.frames = "0";
    var h = document.createElement("h2");
    var name = document.createElement("span");
    name.textContent = device;
    var state = document.createElement("span");
    state.className = "status active state";
    state.textContent = "live";
    h.appendChild(name);
    h.appendChild(state);
    var canvas = document.createElement("canvas");
    canvas.width = 640;
    canvas.height = 480;
    canvas.dataset.boxes = "0";
    var list = document.createElement("ul");
    list.className = "detections";
    var answer = document.createElement("p");
    answer.className = "answer";
    t.appendChild(h);
    t.appendChild(canvas);
    t.appendChild(list);
    t.appendChild(answer);
    tiles.appendChild(t);
    return t;
  }

  function drawFrame(msg) {
    var t = tile(msg.device);
    if (t.classList.contains("revoked")) { return; }
    var canvas = t.querySelector("canvas");
    var img = new Image();
    img.onload = function () {
      canvas.width = msg.width;
      canvas.height = msg.height;
      var ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      ctx.lineWidth = Math.max(2, msg.width / 200);
      ctx.font = Math.max(12, Math.round(msg.width / 32)) + "px sans-serif";
      ctx.textBaseline = "top";
      var list = t.querySelector("ul.detections");
      list.textContent = "";
      msg.detections.forEach(function (d, i) {
        var c = colours[i % colours.length];
        var x = d.box[0] * msg.width, y = d.box[1] * msg.height;
        var w = (d.box[2] - d.box[0]) * msg.width, h = (d.box[3] - d.box[1]) * msg.height;
        ctx.strokeStyle = c;
        ctx.strokeRect(x, y, w, h);
        var text = d.label + " " + Math.round(d.score * 100) + "%" + (d.escalated ? " ↑core" : "");
        var tw = ctx.measureText(text).width + 8;
        ctx.fillStyle = c;
        ctx.fillRect(x, Math.max(0, y - 20), tw, 20);
        ctx.fillStyle = "#000";
        ctx.fillText(text, x + 4, Math.max(0, y - 18));
        var li = document.createElement("li");
        li.className = "det";
        li.dataset.label = d.label;
        li.textContent = text;
        list.appendChild(li);
      });
      canvas.dataset.boxes = String(msg.detections.length);
      t.dataset.frames = String(Number(t.dataset.frames) + 1);
      t.dataset.frameId = msg.frame_id;
    };
    img.src = msg.image;
  }

  function stats(msg) {
    function set(id, v) { var e = document.getElementById(id); if (e) { e.textContent = v; } }
    set("s-devices", msg.devices.join(", "));
    set("s-fps", msg.fps);
    set("s-cache", msg.cache_hit_rate === null ? "-" : Math.round(msg.cache_hit_rate * 100) + "%");
    set("s-lag", msg.feed_lag_s + " s");
    set("s-model", msg.model);
    set("s-provider", msg.provider);
    var h = document.getElementById("health");
    h.textContent = msg.healthy ? "healthy" : "revocation feed stale";
    h.className = "status " + (msg.healthy ? "healthy" : "unhealthy");
    msg.revoked.forEach(function (d) { var t = document.getElementById("tile-" + d); if (t) { revoked(t, ""); } });
  }

  function revoked(t, reason) {
    t.classList.add("revoked");
    var s = t.querySelector(".state");
    s.className = "status revoked state";
    s.textContent = "revoked: cut off" + (reason ? " (" + reason + ")" : "");
  }

  var source = new EventSource("/api/live");
  source.onmessage = function (e) {
    var msg = JSON.parse(e.data);
    if (msg.type === "frame") { drawFrame(msg); }
    else if (msg.type === "stats") { stats(msg); }
    else if (msg.type === "answer") {
      var a = tile(msg.device).querySelector(".answer");
      a.textContent = "core answered " + (msg.still_unknown ? "unknown" : msg.label + " " + Math.round(msg.score * 100) + "%") +
        (msg.edge_label ? " (edge guessed " + msg.edge_label + ")" : "");
    } else if (msg.type === "revoked") { revoked(tile(msg.device), msg.reason); }
  };
})();

// A login link carries its secret in the URL fragment (#link=… or #token=…), which the
// browser never sends to a server; move it into the form, drop it from the address bar and
// history, and submit the form (a POST).
(function () {
  "use strict";
  var hash = window.location.hash.slice(1);
  if (!hash) { return; }
  history.replaceState(null, "", window.location.pathname);
  var m = /^(link|token)=(.+)$/.exec(hash);
  if (!m) { return; }
  var input = document.getElementById("token");
  input.value = decodeURIComponent(m[2]);
  document.getElementById("login-form").submit();
})();

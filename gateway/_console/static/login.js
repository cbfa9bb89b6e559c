// A login link carries its secret in the URL fragment (#link=… or #token=…), which the
// browser never sends to a server; move it into the form, drop it from the address bar and
// history, and submit the form (a POST). Also when only the fragment changes (a link opened
// on the login page itself is not a new page load).
(function () {
  "use strict";
  function take() {
    var hash = window.location.hash.slice(1);
    if (!hash) { return; }
    history.replaceState(null, "", window.location.pathname);
    var m = /^(link|token)=(.+)$/.exec(hash);
    if (!m) { return; }
    document.getElementById("token").value = decodeURIComponent(m[2]);
    document.getElementById("login-form").submit();
  }
  window.addEventListener("hashchange", take);
  take();
})();

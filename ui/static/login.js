// medtl's sign-in page: a client locked out after failed sign-ins gets 429 with the seconds left
// (medtl_ui.login.LockedOutMiddleware); Gradio's own form reacts to 400 only, so the words are shown here.
(function () {
  "use strict";
  if (window.__medtlLogin) return;
  window.__medtlLogin = true;
  var LOCKED = 429, ID = "medtl-locked";

  function say(text) {
    var el = document.getElementById(ID);
    if (!text) {
      if (el) el.remove();
      return;
    }
    if (!el) {
      el = document.createElement("div");
      el.id = ID;
      el.setAttribute("role", "alert");
      document.body.appendChild(el);
    }
    el.textContent = text;
  }

  var fetch0 = window.fetch;
  window.fetch = function (input, init) {
    var url = typeof input === "string" ? input : (input && input.url) || "";
    var answer = fetch0.apply(this, arguments);
    if (!/\/login\/?$/.test(String(url).split("?")[0])) return answer;
    return answer.then(function (resp) {
      if (resp.status === LOCKED) {
        resp.clone().json().then(function (body) { say(body && body.detail); }, function () {
          say("Too many failed sign-ins from this computer: try again later.");
        });
      } else {
        say("");
      }
      return resp;
    });
  };
})();

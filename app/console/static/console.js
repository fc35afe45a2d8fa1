// The review console's keyboard shortcuts and claim timer. Plain script, shipped with Verdict (no CDN); every action
// it triggers is an ordinary form or link of the page, so the console works without it too. The shortcuts are
// listed in the page's help (press ?) and in docs/review.md.
(function () {
  "use strict";

  function typing(target) {
    var tag = target && target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable);
  }

  function submit(id) {
    var form = document.getElementById(id);
    if (form) { form.requestSubmit ? form.requestSubmit() : form.submit(); return true; }
    return false;
  }

  function follow(id) {
    var link = document.getElementById(id);
    if (link) { link.click(); return true; }
    return false;
  }

  // ---- the queue: j/k move a selection over the rows, Enter follows the row's link (it has the focus)
  var rows = Array.prototype.slice.call(document.querySelectorAll("tr[data-row]"));
  var selected = -1;
  function select(index) {
    if (!rows.length) { return; }
    selected = Math.max(0, Math.min(rows.length - 1, index));
    rows.forEach(function (row, i) { row.classList.toggle("selected", i === selected); });
    var link = rows[selected].querySelector("a.row-link");
    if (link) { link.focus(); }
  }

  // ---- an item: a/b choose the decision and go to the reason; Ctrl+Enter records it
  function choose(value) {
    var radio = document.getElementById("decision-" + value);
    var reason = document.getElementById("reason");
    if (!radio || !reason) { return false; }
    radio.checked = true;
    reason.focus();
    return true;
  }

  var reason = document.getElementById("reason");
  if (reason) {
    reason.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        submit("decision-form");
      }
    });
  }

  var help = document.getElementById("help");
  var helpOpen = document.getElementById("help-open");
  function toggleHelp() {
    if (!help || typeof help.showModal !== "function") { return; }
    if (help.open) { help.close(); } else { help.showModal(); }
  }
  if (helpOpen) { helpOpen.addEventListener("click", toggleHelp); }

  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape" && typing(event.target)) { event.target.blur(); return; }
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) { return; }
    if (help && help.open && event.key !== "?") { return; }
    var handled = true;
    switch (event.key) {
      case "j": select(selected + 1); break;
      case "k": select(selected < 0 ? 0 : selected - 1); break;
      case "n": handled = submit("claim-next-form"); break;
      case "c": handled = submit("claim-form"); break;
      case "a": handled = choose("allow"); break;
      case "b": handled = choose("block"); break;
      case "e": handled = submit("extend-form"); break;
      case "r": handled = submit("release-form"); break;
      case "s": handled = follow("submission-link"); break;
      case "q": window.location.href = "/console/queue"; break;
      case "/": var lookup = document.getElementById("lookup-id"); if (lookup) { lookup.focus(); } else { handled = false; } break;
      case "?": toggleHelp(); break;
      default: handled = false;
    }
    if (handled) { event.preventDefault(); }
  });

  // ---- the claim timer: time left, and a clear message once the claim has expired under the reviewer
  var timer = document.getElementById("claim-timer");
  if (timer) {
    var expires = Date.parse(timer.getAttribute("data-expires"));
    var expiredNote = document.getElementById("claim-expired");
    var tick = function () {
      var left = Math.round((expires - Date.now()) / 1000);
      if (left <= 0) {
        timer.textContent = "Your claim has expired.";
        if (expiredNote) { expiredNote.hidden = false; }
        return;
      }
      // Whole minutes only, so the live region speaks once a minute, not every second.
      var text = left > 60 ? "This item is yours for about " + Math.ceil(left / 60) + " more minutes."
        : "This item is yours for less than a minute more: decide or extend it.";
      if (timer.textContent !== text) { timer.textContent = text; }
      window.setTimeout(tick, 1000);
    };
    tick();
  }
}());

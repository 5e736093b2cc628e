(function () {
  "use strict";
  if (window.medtlViewer) return;  // the head may be injected more than once

  var SCAN = "#scan", LEVEL = "#level", WIDTH = "#width", SLICE = "#slice";
  var THROTTLE_MS = 100;   // at most one window/level update per this, while dragging
  var WL_PIXELS = 256;     // a drag of this many pixels changes level/width by one width
  var WHEEL_STEP = 40;     // pixels of wheel delta for one slice (a mouse notch is more)
  var ZOOM_MIN = 1, ZOOM_MAX = 16;

  var view = { s: 1, tx: 0, ty: 0 };
  var stats = { commits: 0, slices: 0 };
  var drag = null, pendingWL = null, commitTimer = 0, lastCommit = -1e9;
  var wheelAcc = 0, suppressClick = false, naturalKey = "";

  function clamp(v, lo, hi) { return Math.min(hi, Math.max(lo, v)); }
  function num(s, d) { var v = parseFloat(s); return isFinite(v) ? v : d; }
  function image() { var r = document.querySelector(SCAN); return r ? r.querySelector("img") : null; }
  function numberInput(sel) { return document.querySelector(sel + " input[type=number]"); }
  function rangeInput() { return document.querySelector(SLICE + " input[type=range]"); }
  function usable(el) { return !!el && !el.disabled && el.getClientRects().length > 0; }

  // The target is the image or one of its wrappers inside #scan (not the toolbar, label, ...).
  function inViewer(t, img) {
    if (!img || !t || t.nodeType !== 1) return false;
    if (t === img) return true;
    var root = img.closest(SCAN);
    return !!root && root.contains(t) && t !== root && t.contains(img);
  }
  // A pointer event over the image's frame: on the image, or on what Gradio lays over it inside #scan
  // (the loading overlay shown while the server renders), but not on the toolbar's buttons and links.
  function overImage(e, img) {
    var t = e.target;
    if (inViewer(t, img)) return true;
    if (!img || !t || t.nodeType !== 1) return false;
    var root = img.closest(SCAN);
    if (!root || !root.contains(t) || t.closest("a, button.icon-button, input, select, textarea, label, " +
        ".icon-button-wrapper, .medtl-viewer-hud")) return false;
    var r = (img.closest(".image-frame") || img.parentElement).getBoundingClientRect();
    return e.clientX >= r.left && e.clientX <= r.right && e.clientY >= r.top && e.clientY <= r.bottom;
  }

  function setInput(input, value) {
    var v = String(value);
    if (input.value === v) return false;
    input.value = v;
    // Gradio 6's Number and Slider bind their value to the `input` event; the component then
    // fires its own `change` (and `input`) event, which runs the Python listeners.
    input.dispatchEvent(new Event("input", { bubbles: true }));
    return true;
  }

  // ---- window / level -----------------------------------------------------------------------
  function decimals(width) {
    return clamp(Math.ceil(-Math.log10(Math.max(width, 1e-9) / 100)), 0, 6);
  }
  function roundTo(v, d) { var f = Math.pow(10, d); return Math.round(v * f) / f; }

  function commitWL() {
    clearTimeout(commitTimer); commitTimer = 0;
    if (!pendingWL) return;
    var p = pendingWL, lv = numberInput(LEVEL), wd = numberInput(WIDTH);
    pendingWL = null; lastCommit = performance.now();
    var changed = false;
    if (usable(wd)) changed = setInput(wd, p.width) || changed;
    if (usable(lv)) changed = setInput(lv, p.level) || changed;
    if (changed) stats.commits++;
    hud();
  }
  function scheduleCommit() {
    var wait = THROTTLE_MS - (performance.now() - lastCommit);
    if (wait <= 0) commitWL();
    else if (!commitTimer) commitTimer = setTimeout(commitWL, wait);
  }

  // ---- slices -------------------------------------------------------------------------------
  function stepSlice(n, absolute) {
    var r = rangeInput();
    if (!usable(r)) return false;
    var lo = num(r.min, 0), hi = num(r.max, 100), st = num(r.step, 1) || 1;
    var cur = num(r.value, lo);
    var next = absolute === "first" ? lo : absolute === "last" ? hi : clamp(cur + n * st, lo, hi);
    next = roundTo(next, 6);
    if (setInput(r, next)) stats.slices++;
    hud();
    return true;
  }
  function pageSteps() {
    var r = rangeInput();
    if (!r) return 1;
    var st = num(r.step, 1) || 1;
    return Math.max(1, Math.round((num(r.max, 100) - num(r.min, 0)) / st / 10));
  }

  // ---- zoom / pan (client side only) --------------------------------------------------------
  function applyView() {
    var img = image();
    if (!img) return;
    var w = img.offsetWidth, h = img.offsetHeight;
    if (view.s <= 1) { view.s = 1; }
    if (w > 0 && h > 0) {  // keep at least a quarter of the image inside its frame (once laid out)
      view.tx = clamp(view.tx, 0.25 * w - view.s * w, 0.75 * w);
      view.ty = clamp(view.ty, 0.25 * h - view.s * h, 0.75 * h);
    }
    var t = (view.s === 1 && view.tx === 0 && view.ty === 0) ? "" :
      "translate(" + view.tx.toFixed(2) + "px, " + view.ty.toFixed(2) + "px) scale(" + view.s.toFixed(4) + ")";
    if (img.style.transform !== t) img.style.transform = t;
    hud();
  }
  function zoomAt(f, cx, cy) {
    var img = image();
    if (!img) return;
    var s = clamp(view.s * f, ZOOM_MIN, ZOOM_MAX);
    if (s === view.s) return;
    var rect = img.getBoundingClientRect();
    var ox = rect.left - view.tx, oy = rect.top - view.ty;  // the untransformed top-left corner
    if (cx == null) { cx = ox + img.offsetWidth / 2; cy = oy + img.offsetHeight / 2; }
    var px = cx - ox, py = cy - oy;
    view.tx = px - (s / view.s) * (px - view.tx);
    view.ty = py - (s / view.s) * (py - view.ty);
    view.s = s;
    if (s === 1) { view.tx = 0; view.ty = 0; }
    applyView();
  }
  function resetView() { view.s = 1; view.tx = 0; view.ty = 0; applyView(); }

  // ---- caption ------------------------------------------------------------------------------
  function fmt(v) { return isFinite(v) ? String(+v.toFixed(4)) : "?"; }
  function hud() {
    var root = document.querySelector(SCAN);
    if (!root) return;
    var el = root.querySelector(":scope > .medtl-viewer-hud");
    if (!el) {
      el = document.createElement("div");
      el.className = "medtl-viewer-hud";
      el.setAttribute("aria-live", "off");
      root.appendChild(el);
    }
    var parts = [], img = root.querySelector("img");
    if (img) {
      var lv = numberInput(LEVEL), wd = numberInput(WIDTH);
      var l = pendingWL ? pendingWL.level : lv ? num(lv.value, NaN) : NaN;
      var w = pendingWL ? pendingWL.width : wd ? num(wd.value, NaN) : NaN;
      if (usable(lv) && usable(wd)) parts.push("W " + fmt(w) + " L " + fmt(l));  // none for colour images
      parts.push("zoom " + view.s.toFixed(1) + "\u00d7");
      var r = rangeInput();
      if (usable(r)) {
        var lo = num(r.min, 0), st = num(r.step, 1) || 1;
        var i = Math.round((num(r.value, lo) - lo) / st) + 1, n = Math.round((num(r.max, lo) - lo) / st) + 1;
        parts.push("slice " + i + "/" + n);
      }
    }
    var text = parts.join(" \u00b7 ");
    if (el.textContent !== text) el.textContent = text;
  }

  // ---- keep the current <img> prepared --------------------------------------------------------
  function prepare(img) {
    if (!img.classList.contains("medtl-viewer")) img.classList.add("medtl-viewer");
    if (img.draggable) img.draggable = false;
    if (!img.hasAttribute("tabindex")) img.setAttribute("tabindex", "0");
    if (!img.hasAttribute("aria-label")) img.setAttribute("aria-label", "Image viewer: drag for window/level, wheel for slices");
    applyView();
  }
  var scheduled = false;
  function refresh() {
    scheduled = false;
    var img = image();
    if (img) prepare(img); else hud();
  }
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    (window.requestAnimationFrame || setTimeout)(refresh);
  }

  // ---- events (delegated on document: they survive any re-render) ------------------------------
  document.addEventListener("pointerdown", function (e) {
    var img = image();
    if (drag) endDrag({ pointerId: drag.id });  // a release we never saw
    if (!overImage(e, img) || e.button > 2) return;
    var lv = numberInput(LEVEL), wd = numberInput(WIDTH);
    var mode = (e.button === 0 && !e.shiftKey && usable(lv) && usable(wd)) ? "wl" : "pan";
    e.preventDefault();
    img.focus({ preventScroll: true });
    drag = { mode: mode, id: e.pointerId, x0: e.clientX, y0: e.clientY, moved: false, tx0: view.tx, ty0: view.ty };
    if (mode === "wl") {
      var wmin = num(wd.min, 0) > 0 ? num(wd.min, 1) : 1;
      drag.wmin = wmin; drag.wmax = num(wd.max, Infinity);
      drag.lmin = num(lv.min, -Infinity); drag.lmax = num(lv.max, Infinity);
      drag.width0 = Math.max(wmin, num(wd.value, wmin));
      drag.level0 = num(lv.value, 0);
    } else {
      img.classList.add("medtl-panning");
    }
  }, true);

  window.addEventListener("pointermove", function (e) {
    if (!drag || e.pointerId !== drag.id) return;
    if (e.pointerType === "mouse" && e.buttons === 0) { endDrag(e); return; }  // released out of sight
    var dx = e.clientX - drag.x0, dy = e.clientY - drag.y0;
    if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 2) return;
    drag.moved = true;
    e.preventDefault();
    if (drag.mode === "pan") {
      view.tx = drag.tx0 + dx; view.ty = drag.ty0 + dy;
      applyView();
    } else {
      var k = drag.width0 / WL_PIXELS;
      var w = clamp(drag.width0 + dx * k, drag.wmin, drag.wmax);
      var d = decimals(drag.width0);
      pendingWL = {
        width: Math.max(drag.wmin, roundTo(w, d)),
        level: clamp(roundTo(drag.level0 + dy * k, d), drag.lmin, drag.lmax)
      };
      hud();
      scheduleCommit();
    }
  }, true);

  function endDrag(e) {
    if (!drag || e.pointerId !== drag.id) return;
    if (drag.mode === "wl") commitWL();  // the final update, at once
    var img = image();
    if (img) img.classList.remove("medtl-panning");
    if (drag.moved) { suppressClick = true; setTimeout(function () { suppressClick = false; }, 0); }
    drag = null;
  }
  window.addEventListener("pointerup", endDrag, true);
  window.addEventListener("pointercancel", endDrag, true);

  window.addEventListener("click", function (e) {
    if (suppressClick) { e.preventDefault(); e.stopPropagation(); suppressClick = false; }
  }, true);

  document.addEventListener("wheel", function (e) {
    var img = image();
    if (!overImage(e, img)) return;
    var unit = e.deltaMode === 1 ? 33 : e.deltaMode === 2 ? 400 : 1;
    var dy = (e.deltaY || e.deltaX) * unit;
    if (e.ctrlKey || e.metaKey) {  // zoom (a trackpad pinch arrives as ctrl+wheel too)
      e.preventDefault();
      zoomAt(Math.exp(-clamp(dy, -200, 200) * 0.002), e.clientX, e.clientY);
      return;
    }
    if (!usable(rangeInput())) return;  // a 2D image: let the page scroll
    e.preventDefault();
    if (wheelAcc * dy < 0) wheelAcc = 0;
    wheelAcc += dy;
    if (Math.abs(wheelAcc) >= WHEEL_STEP) { stepSlice(wheelAcc > 0 ? 1 : -1); wheelAcc = 0; }
  }, { passive: false, capture: true });

  document.addEventListener("keydown", function (e) {
    var img = image();
    if (e.altKey || e.ctrlKey || e.metaKey || !inViewer(document.activeElement, img)) return;
    var handled = true;
    switch (e.key) {
      case "ArrowUp": stepSlice(-1); break;
      case "ArrowDown": stepSlice(1); break;
      case "PageUp": stepSlice(-pageSteps()); break;
      case "PageDown": stepSlice(pageSteps()); break;
      case "Home": stepSlice(0, "first"); break;
      case "End": stepSlice(0, "last"); break;
      case "+": case "=": zoomAt(1.25); break;
      case "-": case "_": zoomAt(0.8); break;
      case "r": case "R": resetView(); break;
      default: handled = false;
    }
    if (handled) { e.preventDefault(); e.stopPropagation(); }
  }, true);

  document.addEventListener("dblclick", function (e) {
    if (!overImage(e, image())) return;
    e.preventDefault();
    resetView();
  }, true);
  document.addEventListener("contextmenu", function (e) {
    if (overImage(e, image())) e.preventDefault();
  }, true);
  document.addEventListener("dragstart", function (e) {
    if (inViewer(e.target, image())) e.preventDefault();
  }, true);
  // a new image of another size (a new upload) starts with a fresh view
  document.addEventListener("load", function (e) {
    var img = image();
    if (e.target !== img) return;
    var key = img.naturalWidth + "x" + img.naturalHeight;
    if (naturalKey && key !== naturalKey) resetView();
    naturalKey = key;
    schedule();
  }, true);

  function start() {
    new MutationObserver(schedule).observe(document.body, {
      childList: true, subtree: true, attributes: true, attributeFilter: ["src", "class", "style"]
    });
    setInterval(schedule, 500);  // values set by the server change no attribute: keep the caption fresh
    schedule();
  }
  if (document.body) start(); else document.addEventListener("DOMContentLoaded", start);

  window.medtlViewer = {
    view: view, stats: stats, reset: resetView, zoom: zoomAt, step: stepSlice,
    throttleMs: THROTTLE_MS, wlPixels: WL_PIXELS
  };
})();

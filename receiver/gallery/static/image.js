// Image page: wait for decoding to finish, then a zoomable viewer (click 2x, wheel, drag, double-click resets;
// keys + - 0 and the arrows once it has focus) that shows the JPEG until zoomed in, then the exact PNG.
"use strict";
(function () {
  // The delete lands on the grid this tab last showed (gallery.js names it): its filter and page, not the
  // whole grid. Without a script or a name it lands on the whole grid.
  const remove = document.querySelector("#delete form");
  try {
    const grid = sessionStorage.getItem("aeic.grid");
    if (grid) remove.action += "?" + new URLSearchParams({back: grid});
  } catch (err) {}
  const detail = document.getElementById("detail");
  const status = detail.dataset.status;
  // The newer and older image of the grid this tab last showed (gallery.js keeps its cards' order): its filter
  // is kept, so a failed image's page steps through the failed ones. None where the page was not opened
  // from a grid, or at the grid page's ends.
  try {
    const cards = JSON.parse(sessionStorage.getItem("aeic.grid.ids") || "[]");
    const at = cards.indexOf(detail.dataset.id);
    const root = document.documentElement.dataset.root || "";
    for (const [id, other] of [["newer-image", cards[at - 1]], ["older-image", cards[at + 1]]]) {
      const link = document.getElementById(id);
      if (at < 0 || !other) continue;
      link.href = root + "/images/" + encodeURIComponent(other);
      link.hidden = false;
    }
  } catch (err) {}  // no storage (a privacy setting), or not a list: no steps
  if (status === "pending" || status === "decoding") {
    // pending -> decoding, and a failed attempt that will be retried, are said in place (the status lines
    // are live regions; focus and scroll stay where they are); the page reloads only to show the outcome.
    const waiting = document.getElementById("waiting");
    const cell = document.getElementById("m-status");
    const retrying = document.getElementById("retrying");
    const attempts = document.getElementById("m-attempts");
    const put = (node, text) => {  // a live region: change it only when the words change
      if (node.textContent !== text) node.textContent = text;
    };
    const show = (text, now) => {
      put(waiting, text);
      put(cell, now);
    };
    const note = (image) => {  // a failed attempt leaves its error on the image until the next one ends
      put(attempts, String(image.attempts));
      put(retrying, image.error ? "Attempt " + image.attempts + " failed: " + image.error + "; trying again." : "");
      retrying.hidden = !image.error;
    };
    // As the grid's polls (gallery.js): one the receiver (or a dead link) does not answer is said after SLOW_MS,
    // not left under "pending…" for as long as the browser waits, and given up after GIVE_UP_MS to ask afresh.
    // A tab in the background asks nothing (each poll is a query, for nobody to see); shown again, it asks at once.
    const POLL_MS = 1000, SLOW_MS = 10000, GIVE_UP_MS = 60000;
    let timer = 0, busy = false;
    const schedule = (ms) => {
      window.clearTimeout(timer);
      timer = window.setTimeout(poll, ms);
    };
    const stalled = (why) => show(detail.dataset.status + "… (not updating: " + why + ")", detail.dataset.status);
    const poll = async () => {
      busy = true;
      const giveUp = new AbortController();
      const slow = window.setTimeout(
        () => stalled("the receiver has not answered for " + SLOW_MS / 1000 + " s; waiting"), SLOW_MS);
      const stop = window.setTimeout(() => giveUp.abort(), GIVE_UP_MS);
      try {
        const response = await fetch((document.documentElement.dataset.root || "") + "/v1/images/" + detail.dataset.id,
                                     {credentials: "same-origin", signal: giveUp.signal});
        // Deleted meanwhile, or signed out: the reloaded page says so ("No image ..." or the token form).
        if (response.status === 404 || response.status === 401) { window.location.reload(); return; }
        if (!response.ok) throw new Error("the receiver answered HTTP " + response.status);
        const image = await response.json();
        const now = image.status;
        if (now !== "pending" && now !== "decoding") { window.location.reload(); return; }
        detail.dataset.status = now;
        show(now + "…", now);
        note(image);
      } catch (err) {  // keep waiting, and say why nothing changes
        const why = giveUp.signal.aborted ? "the receiver did not answer in " + GIVE_UP_MS / 1000 + " s"
          : err instanceof TypeError ? "cannot reach the receiver" : err.message;
        stalled(why + "; retrying");
      } finally {
        window.clearTimeout(slow);
        window.clearTimeout(stop);
        busy = false;
      }
      if (!document.hidden) schedule(POLL_MS);
    };
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) window.clearTimeout(timer);
      else if (!busy) schedule(0);
    });
    schedule(POLL_MS);
    return;
  }
  const viewer = document.getElementById("viewer");
  const img = document.getElementById("reconstruction");
  const label = document.getElementById("zoom-level");
  if (!viewer || !img) return;
  // The picture is shown as its JPEG: a 12 MP photo's PNG is 13.5 MB (76 s on Chrome's "3G" profile) and its
  // JPEG 1.1 MB, for a picture drawn a few hundred pixels wide. Zooming in fetches the exact PNG, where its
  // pixels matter, and swaps it in once decoded (the JPEG stays on screen meanwhile). A JPEG that cannot be
  // had (503 while other downloads hold the conversion budget) gives way to the PNG at once.
  const shownAs = document.getElementById("shown-as");
  let exact = false;
  function showExact() {
    if (exact) return;
    exact = true;
    shownAs.textContent = "Loading the exact PNG…";
    const png = new Image();
    png.src = img.dataset.exact;
    png.decode().then(() => {
      img.src = png.src;
      shownAs.textContent = "Shown as the exact PNG.";
    }, () => {  // try again at the next zoom
      exact = false;
      shownAs.textContent = "Shown as a JPEG copy; the exact PNG did not load (zoom again to retry).";
    });
  }
  // What the page says of the picture follows what arrived: "Shown as the exact PNG." was said before the PNG
  // came, and stayed under a broken picture when it did not come either (the blob store out, the link down).
  const exactUrl = new URL(img.dataset.exact, window.location.href).href;
  function pictureFailed() {
    if (img.src !== exactUrl) {  // the JPEG: the PNG instead
      exact = true;
      shownAs.textContent = "Loading the exact PNG…";
      img.src = exactUrl;
    } else {
      shownAs.textContent = "The picture did not load; reload the page to try again.";
    }
  }
  img.addEventListener("error", pictureFailed);
  img.addEventListener("load", () => {
    if (img.src === exactUrl) shownAs.textContent = "Shown as the exact PNG.";
  });
  if (img.complete && img.naturalWidth === 0) pictureFailed();  // it failed before this script ran
  // A WebP or JPEG is converted from the PNG by its first download (a 12 MP photo's WebP: 1.5-3.1 s; 8192x8192:
  // 45-55 s), and refused with 503 while other conversions hold their budget. A plain link showed nothing
  // until the answer began, and the browser reported a 503 as a failed download with no reason; so the page
  // fetches it itself, says what it is doing, and saves what arrives. The PNG and the stream need no
  // conversion and stay plain links (streamed to disk, whatever their size).
  const downloadNote = document.getElementById("download-note");
  for (const link of document.querySelectorAll(".downloads a[data-converted]")) {
    link.addEventListener("click", async (event) => {
      if (event.ctrlKey || event.metaKey || event.shiftKey || event.altKey) return;  // the browser's own ways
      event.preventDefault();
      if (link.getAttribute("aria-busy") === "true") return;  // a second click while the first is made
      link.setAttribute("aria-busy", "true");
      downloadNote.textContent = "Preparing the " + link.textContent + "…";
      try {
        const response = await fetch(link.href, {credentials: "same-origin"});
        if (response.status === 401) { window.location.reload(); return; }  // signed out: the token form
        if (response.status === 503) {
          downloadNote.textContent = "The receiver is converting other downloads; try the " + link.textContent +
            " again in " + (response.headers.get("Retry-After") || "a few") + " s, or take the PNG.";
          return;
        }
        if (!response.ok) throw new Error("the receiver answered HTTP " + response.status);
        const save = document.createElement("a");
        save.href = URL.createObjectURL(await response.blob());
        save.download = link.getAttribute("download");
        save.click();
        window.setTimeout(() => URL.revokeObjectURL(save.href), 60000);
        downloadNote.textContent = "";
      } catch (err) {
        const why = err instanceof TypeError ? "cannot reach the receiver" : err.message;
        downloadNote.textContent = "The " + link.textContent + " did not download: " + why + ".";
      } finally {
        link.removeAttribute("aria-busy");
      }
    });
  }
  const MIN = 1, MAX = 16;
  let scale = 1, x = 0, y = 0, drag = null, moved = false;

  function clamp() {
    const w = viewer.clientWidth, h = viewer.clientHeight;
    x = Math.min(0, Math.max(w - img.clientWidth * scale, x));
    y = Math.min(0, Math.max(h - img.clientHeight * scale, y));
  }
  // `scale` is of the picture fitted to the view; the page says the level of its true size, which "100%" at
  // the fit was not (a 640 px picture fitted to a phone was 54%). 1 shows the true pixels, 0 fits it again.
  const trueScale = () => Number(img.getAttribute("width")) / img.clientWidth;  // Infinity before it is laid out
  function level() {
    const one = trueScale();
    if (!Number.isFinite(one)) return "fitted to the view";
    const said = Math.round(scale / one * 100) + "%";
    if (Math.abs(scale - one) < 1e-6) return said + " (true pixels)";
    return scale === 1 ? said + " (fitted to the view)" : said;
  }
  function apply() {
    clamp();
    img.style.transform = "translate(" + x + "px, " + y + "px) scale(" + scale + ")";
    viewer.dataset.scale = String(scale);
    const said = level();
    if (label.textContent !== said) label.textContent = said;  // a live region: said only when it changes
    viewer.classList.toggle("zoomed", scale > 1);
    if (scale > 1) showExact();
  }
  // Zoom to `next` keeping the image point under (px, py) fixed on screen.
  function zoomAt(next, px, py) {
    next = Math.min(Math.max(MAX, trueScale() || 0), Math.max(MIN, next));  // a huge picture's true pixels too
    x = px - (px - x) * (next / scale);
    y = py - (py - y) * (next / scale);
    scale = next;
    apply();
  }
  function local(event) {
    const box = viewer.getBoundingClientRect();
    return [event.clientX - box.left, event.clientY - box.top];
  }
  viewer.addEventListener("wheel", (event) => {
    event.preventDefault();
    const [px, py] = local(event);
    zoomAt(scale * Math.pow(1.2, -Math.sign(event.deltaY)), px, py);
  }, {passive: false});
  // One pointer drags; two (fingers on a phone, where the viewer takes the browser's own pinch-zoom away with
  // touch-action: none) pinch: zoom by the change of their distance, about their midpoint.
  const fingers = new Map();  // pointerId -> [clientX, clientY] of each pointer down on the viewer
  let pinch = null;
  function spread() {
    const [a, b] = [...fingers.values()];
    return {d: Math.hypot(a[0] - b[0], a[1] - b[1]), clientX: (a[0] + b[0]) / 2, clientY: (a[1] + b[1]) / 2};
  }
  viewer.addEventListener("pointerdown", (event) => {
    fingers.set(event.pointerId, [event.clientX, event.clientY]);
    if (fingers.size === 2) {
      pinch = {d: spread().d, scale: scale};
      drag = null;
      moved = true;  // the tap that ends a pinch is no click-to-zoom
      return;
    }
    drag = {sx: event.clientX, sy: event.clientY, x: x, y: y};
    moved = false;
  });
  window.addEventListener("pointermove", (event) => {
    if (fingers.has(event.pointerId)) fingers.set(event.pointerId, [event.clientX, event.clientY]);
    if (pinch && fingers.size === 2) {
      const now = spread();
      if (pinch.d > 0) zoomAt(pinch.scale * now.d / pinch.d, ...local(now));
      return;
    }
    if (!drag) return;
    const dx = event.clientX - drag.sx, dy = event.clientY - drag.sy;
    if (Math.abs(dx) + Math.abs(dy) > 3) moved = true;
    if (moved && scale > 1) { x = drag.x + dx; y = drag.y + dy; apply(); }
  });
  const lift = (event) => {
    fingers.delete(event.pointerId);
    if (fingers.size < 2) pinch = null;
    if (fingers.size === 0) drag = null;
  };
  window.addEventListener("pointerup", lift);
  window.addEventListener("pointercancel", lift);
  viewer.addEventListener("click", (event) => {
    if (moved) return;
    const [px, py] = local(event);
    zoomAt(scale > 1 ? 1 : 2, px, py);
  });
  function reset() { scale = 1; x = 0; y = 0; apply(); }
  viewer.addEventListener("dblclick", reset);
  // Keyboard: + and - zoom about the centre, the arrows pan, 1 shows the true pixels, 0 fits the picture (the
  // viewer takes focus with Tab).
  const PAN = 40;
  viewer.addEventListener("keydown", (event) => {
    const centre = [viewer.clientWidth / 2, viewer.clientHeight / 2];
    const pans = {ArrowLeft: [PAN, 0], ArrowRight: [-PAN, 0], ArrowUp: [0, PAN], ArrowDown: [0, -PAN]};
    if (event.key === "+" || event.key === "=") zoomAt(scale * 1.5, ...centre);
    else if (event.key === "-") zoomAt(scale / 1.5, ...centre);
    else if (event.key === "0") reset();
    else if (event.key === "1") zoomAt(Math.max(MIN, trueScale()), ...centre);
    else if (pans[event.key]) { x += pans[event.key][0]; y += pans[event.key][1]; apply(); }
    else return;
    event.preventDefault();
  });
  img.addEventListener("load", apply);  // laid out: its true size is known (and the fit changes with the window)
  window.addEventListener("resize", apply);
  apply();
})();

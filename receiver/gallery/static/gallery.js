// Live gallery: poll the JSON listing and keep the grid in sync (newest first), reusing cards. The first page
// always; an older page (its `cursor`: the same images again) only while some of its images wait. A grid
// narrowed to one device or status (`data-query`) asks the listing for the same.
// Each poll names the listing it last showed (If-None-Match with its ETag): an unchanged one is a 304 of
// headers only (a 200 is 39 KB at 60 images). The tag is kept here, not in the browser's cache: a listing is
// `no-store`, as a stored one would be shown on Back after sign-out (docs/receiver.md, Security).
"use strict";
(function () {
  const grid = document.getElementById("grid");
  const root = document.documentElement.dataset.root || "";  // the prefix a proxy serves the receiver under
  const first = grid.dataset.live === "true";
  const narrowing = grid.dataset.query ? "&" + grid.dataset.query : "";  // device and status, URL-encoded
  const listing = root + "/v1/images?limit=" + Number(grid.dataset.limit || 60) + narrowing +
    (first ? "" : "&cursor=" + encodeURIComponent(grid.dataset.cursor || ""));
  const waiting = () => grid.querySelector('.card[data-status="pending"], .card[data-status="decoding"]') !== null;
  const empty = document.getElementById("empty");
  const live = document.getElementById("live");
  const pager = document.querySelector(".pager");
  const POLL_MS = 1500, SLOW_MS = 10000, GIVE_UP_MS = 60000;
  let signedOut = false, busy = false, timer = 0, shown = null;  // shown: the ETag of the listing on screen

  // The status line is a live region: change its text only when the state changes, or a screen reader
  // would repeat it on every poll. A problem is said in words (and styled), not shown by colour alone.
  function say(text, problem) {
    if (!live) return;  // an older page has no status line
    if (live.textContent !== text) live.textContent = text;
    live.classList.toggle("error", problem);
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A panorama or a strip is shown whole (letterboxed), not cropped to a sliver; the same rule as _card.html.
  function isExtreme(img) {
    return img.width > 3 * img.height || img.height > 3 * img.width;
  }

  function fillThumb(thumb, img) {
    thumb.replaceChildren();
    if (img.status === "done") {
      const pic = el("img", isExtreme(img) ? "whole" : null);
      pic.loading = "lazy";  // as _card.html: only thumbnails near the viewport are fetched
      pic.src = img.links.thumbnail;  // the listing's links start with the prefix already
      pic.alt = "Decoded image from " + img.device;  // as _card.html
      thumb.appendChild(pic);
    } else {
      thumb.appendChild(el("span", "badge", img.status));
    }
  }

  function makeCard(img) {
    const card = el("a", "card");
    card.href = root + "/images/" + img.id;
    card.dataset.id = img.id;
    const thumb = el("div", "thumb");
    const caption = el("div", "caption");
    caption.append(el("span", "size", img.width + "×" + img.height), " ",
                   el("span", "bytes", img.bytes + " B"), " ",
                   el("span", "bpp", img.bpp.toFixed(4) + " bpp"));
    const line = el("div", "caption dim", img.device + " · ");
    if (img.created_at) {  // as the server's `when`
      const time = el("time");
      time.dateTime = img.created_at;
      aeicLocalTime(time);  // page.js
      line.appendChild(time);
    } else {
      line.append("-");
    }
    card.append(thumb, caption, line);
    return card;
  }

  // New cards and badges turning into pictures are seen, not heard: a screen reader is told, politely, what
  // changed since the page was opened (a running count, so each change is new words and is said).
  const news = document.getElementById("news");
  const changes = {arrived: 0, done: 0, failed: 0};
  function tell() {
    const parts = [];
    if (changes.arrived) parts.push(changes.arrived + (changes.arrived === 1 ? " new image" : " new images"));
    if (changes.done) parts.push(changes.done + " decoded");
    if (changes.failed) parts.push(changes.failed + " failed");
    const text = parts.length ? "Since this page opened: " + parts.join(", ") + "." : "";
    if (news.textContent !== text) news.textContent = text;
  }

  function render(items) {
    const existing = new Map();
    for (const card of grid.querySelectorAll(".card")) existing.set(card.dataset.id, card);
    const wanted = [];
    for (const img of items) {
      let card = existing.get(img.id);
      if (!card) {
        card = makeCard(img);
        changes.arrived += 1;
      } else if (card.dataset.status !== img.status && (img.status === "done" || img.status === "failed")) {
        changes[img.status] += 1;
      }
      if (card.dataset.status !== img.status) {
        fillThumb(card.querySelector(".thumb"), img);
        card.dataset.status = img.status;
        card.className = "card status-" + img.status;
      }
      wanted.push(card);
    }
    wanted.forEach((card, i) => {
      if (grid.children[i] !== card) grid.insertBefore(card, grid.children[i] || null);
    });
    while (grid.children.length > wanted.length) grid.lastElementChild.remove();
    empty.hidden = wanted.length > 0;
    tell();
    remember();
  }

  // The live page always shows the newest `limit` images, so "Older images" must start right after them:
  // follow the listing's cursor (images pushed off this page stay reachable, a page that grew gets the link).
  function syncPager(next) {
    let older = document.getElementById("older");
    document.getElementById("skip-pages").hidden = !next;  // the skip link leads to it (index.html)
    if (!next) {
      if (older) older.remove();
      return;
    }
    if (!older) {
      older = el("a", null, "Older images ");
      older.id = "older";
      const arrow = el("span", null, "→");
      arrow.setAttribute("aria-hidden", "true");  // as index.html: a screen reader says "Older images"
      older.appendChild(arrow);
      pager.appendChild(older);
    }
    older.href = root + "/?" + (narrowing ? narrowing.slice(1) + "&" : "") + "cursor=" + encodeURIComponent(next);
  }

  function schedule(ms) {
    window.clearTimeout(timer);
    timer = window.setTimeout(poll, ms);
  }

  async function poll() {
    busy = true;
    try {
      let response;
      // A poll the receiver does not answer (stalled, or a dead link) is said after SLOW_MS, not left under
      // "Updating live" for as long as the browser waits (minutes), and given up after GIVE_UP_MS to try
      // afresh. It is not given up sooner: the receiver would still be running each abandoned poll.
      // Only the wait for the answer's start is bounded: a slow link may take long over the listing's body.
      const giveUp = new AbortController();
      const slow = window.setTimeout(
        () => say("Not updating: the receiver has not answered for " + SLOW_MS / 1000 + " s; waiting…", true), SLOW_MS);
      const stop = window.setTimeout(() => giveUp.abort(), GIVE_UP_MS);
      try {
        const headers = shown ? {Accept: "application/json", "If-None-Match": shown} : {Accept: "application/json"};
        response = await fetch(listing, {credentials: "same-origin", cache: "no-store", headers,
                                         signal: giveUp.signal});
      } catch (err) {  // no answer at all: the network or the receiver is down, or it did not answer in time
        say(giveUp.signal.aborted
          ? "Not updating: the receiver did not answer in " + GIVE_UP_MS / 1000 + " s; retrying…"
          : "Not updating: cannot reach the receiver (network down?); retrying…", true);
        return;
      } finally {
        window.clearTimeout(slow);
        window.clearTimeout(stop);
      }
      if (response.status === 401) {  // signed out (cookie gone or token revoked): the page asked again
        signedOut = true;             // shows the token form, and signing in there comes back to it
        window.location.reload();
        return;
      }
      if (response.status === 304) {  // the listing on screen is current
        say("Updating live", false);
        return;
      }
      if (!response.ok) {
        say("Not updating: the receiver answered HTTP " + response.status + "; retrying…", true);
        return;
      }
      const page = await response.json();
      render(page.items);
      syncPager(page.next);
      shown = response.headers.get("ETag");
      say("Updating live", false);
    } catch (err) {
      say("Not updating: " + err.message + "; retrying…", true);
    } finally {
      busy = false;
      if (!signedOut && !document.hidden && (first || waiting())) schedule(POLL_MS);
    }
  }
  // A tab in the background polls nothing: each poll costs the receiver a query (and, when anything changed,
  // moves the whole first page), for nobody to see. Shown again, it catches up at once.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) window.clearTimeout(timer);
    else if (!busy && !signedOut && (first || waiting())) schedule(0);
  });
  if (first || waiting()) schedule(POLL_MS);

  // This grid (its filter and older page) is where a delete on an image opened from here returns, and its
  // cards, in order, are what an image's page steps through to the newer and older image (image.js).
  function remember() {
    try {
      const cards = [...grid.querySelectorAll(".card")].map((card) => card.dataset.id);
      sessionStorage.setItem("aeic.grid.ids", JSON.stringify(cards));
    } catch (err) {}  // no storage (a privacy setting): no steps
  }
  try {
    const here = new URLSearchParams(window.location.search);
    here.delete("deleted");
    const query = here.toString();
    sessionStorage.setItem("aeic.grid", "/" + (query ? "?" + query : ""));
  } catch (err) {}  // no storage (a privacy setting): the delete returns to the whole grid
  remember();

  // Back from an image: the browser restores the grid's scroll but not its focus, so the next Tab began at the
  // header again, and a keyboard user tabbed through every card to get back. The history entry keeps the card
  // its image was opened from, which takes the focus again when the entry is shown (by Back or Forward, or
  // page.js's reload out of the back/forward cache; a new visit to the grid is a new entry, with none).
  grid.addEventListener("click", (event) => {
    const card = event.target.closest(".card");
    const elsewhere = event.ctrlKey || event.metaKey || event.shiftKey;  // opened in another tab or window
    if (card && !elsewhere) history.replaceState({...history.state, opened: card.dataset.id}, "");
  });
  const opened = history.state && history.state.opened;
  const openedCard = opened && grid.querySelector('.card[data-id="' + CSS.escape(opened) + '"]');
  if (openedCard) openedCard.focus({preventScroll: true});

  // The filter form leaves out a field left at "any", so the address says only what was asked
  // (`/?status=failed`, not `/?device=&status=failed`).
  const filter = document.querySelector("form.filter");
  filter.addEventListener("submit", () => {
    for (const field of filter.elements) if (field.name && !field.value) field.disabled = true;
  });
  // A name no device can have is refused before it is sent; Chromium's own words ("Please match the
  // requested format.") do not say what the format is. (The admin's grid only: a device sees its own.)
  const device = document.getElementById("filter-device");
  if (device) {
    device.addEventListener("input", () => device.setCustomValidity(device.validity.patternMismatch
      ? "A device's name has only letters, digits and . _ - (no space), and begins with a letter or digit." : ""));
  }
})();

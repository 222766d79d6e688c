// Every gallery page: never show a private page again from the back/forward cache. Chromium may keep even a
// `no-store` page there and restore it on Back, after sign-out too; so a page going into that cache hides its
// content, and one coming back from it asks the server again (which shows the token form once signed out).
// Hidden, not removed from the layout (`hidden` would be display: none): the page keeps its height, so the
// reload keeps the place the visitor had scrolled to.
"use strict";
window.addEventListener("pagehide", (event) => {
  if (event.persisted) document.body.classList.add("leaving");
});
window.addEventListener("pageshow", (event) => {
  if (event.persisted) window.location.reload();
});

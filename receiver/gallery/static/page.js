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

// Times come in UTC (`<time datetime>`, its text "... UTC" for a page whose scripts do not run); each is
// shown in the visitor's own zone, named, with the UTC text as its tooltip. gallery.js uses it for new cards.
function aeicLocalTime(node) {
  const when = new Date(node.dateTime);
  const pad = (n) => String(n).padStart(2, "0");
  const zone = new Intl.DateTimeFormat("en", {timeZoneName: "short"}).formatToParts(when)
    .find((part) => part.type === "timeZoneName").value;
  const utc = when.toISOString().slice(0, 19).replace("T", " ") + " UTC";
  node.textContent = when.getFullYear() + "-" + pad(when.getMonth() + 1) + "-" + pad(when.getDate()) + " " +
    pad(when.getHours()) + ":" + pad(when.getMinutes()) + ":" + pad(when.getSeconds()) + " " + zone;
  node.title = utc;
}
document.addEventListener("DOMContentLoaded", () => {
  for (const node of document.querySelectorAll("time[datetime]")) aeicLocalTime(node);
});

// Links marked .top-link open in the whole window. Inside Airflow the page is in a sandboxed
// iframe that may not navigate the top window itself; a link clicked in the (same-origin)
// parent document may, so the click is handed to one there.
"use strict";

document.querySelectorAll("a.top-link").forEach((link) => {
  link.addEventListener("click", (event) => {
    if (window.top === window.self) return;
    try {
      const twin = window.top.document.createElement("a");
      twin.href = link.href;
      window.top.document.body.appendChild(twin);
      twin.click();
      twin.remove();
      event.preventDefault();
    } catch (error) {
      // another origin: let the browser decide
    }
  });
});

// The approvals queue, live: fetch the server-rendered (escaped) queue every two seconds and
// swap it in when the set of held calls changed, unless the person is typing in it.
"use strict";
(function () {
  const holder = document.getElementById("queue");
  if (!holder) return;
  const source = holder.getAttribute("data-source");
  const ids = (root) => {
    const queue = root.querySelector(".queue");
    return queue ? queue.getAttribute("data-ids") : "";
  };
  async function refresh() {
    if (holder.contains(document.activeElement) && document.activeElement.tagName === "INPUT") {
      return;
    }
    try {
      const answer = await fetch(source, { credentials: "same-origin", cache: "no-store" });
      if (!answer.ok) return;
      const parsed = new DOMParser().parseFromString(await answer.text(), "text/html");
      if (ids(parsed) !== ids(holder)) {
        holder.replaceChildren(...parsed.body.childNodes);
      }
    } catch (error) {
      // The gateway may be restarting: try again at the next tick.
    }
  }
  setInterval(refresh, 2000);
})();

// watcher checkout page: live status over Server-Sent Events (one stream per open page), a
// countdown, and a copy button. Only textContent and attributes are set: nothing from the
// stream is ever parsed as HTML.
"use strict";
(function () {
  const card = document.querySelector("main[data-events]");
  if (!card) return;
  const $ = (field) => card.querySelector(`[data-field="${field}"]`);
  const skew = Number(card.dataset.now) - Date.now(); // the server's clock, not the device's

  // countdown to expiry
  const expires = $("expires");
  const deadline = expires ? Date.parse(expires.getAttribute("datetime")) : NaN;
  function tick() {
    if (!expires || isNaN(deadline)) return;
    let left = Math.max(0, Math.floor((deadline - (Date.now() + skew)) / 1000));
    const h = Math.floor(left / 3600), m = Math.floor((left % 3600) / 60), s = left % 60;
    const pad = (n) => String(n).padStart(2, "0");
    expires.textContent = (h ? h + ":" + pad(m) : String(m)) + ":" + pad(s);
  }
  tick();
  setInterval(tick, 1000);

  // copy the address
  const copy = card.querySelector("button[data-copy]");
  if (copy && navigator.clipboard) {
    copy.hidden = false;
    const label = copy.textContent;
    copy.addEventListener("click", () => {
      navigator.clipboard.writeText($("address").textContent.trim()).then(() => {
        copy.textContent = card.dataset.copied;
        setTimeout(() => { copy.textContent = label; }, 1500);
      });
    });
  }

  // live status
  function apply(st) {
    const status = $("status");
    status.textContent = st.label;
    status.dataset.status = st.status;
    status.dataset.state = st.state;
    status.className = "badge state-" + st.state;
    $("pay").hidden = !st.payable;
    $("lead").textContent = st.lead;
    $("amount").textContent = st.amount_shown; // after a partial payment: the rest
    if (st.payment_uri && st.qr) { // after a partial payment: a request for the rest
      $("payment-uri").href = st.payment_uri;
      const svg = $("qr").querySelector("svg");
      svg.setAttribute("viewBox", `0 0 ${st.qr.size} ${st.qr.size}`);
      svg.querySelector("rect").setAttribute("width", st.qr.size);
      svg.querySelector("rect").setAttribute("height", st.qr.size);
      svg.querySelector("path").setAttribute("d", st.qr.path);
    }
    const redirect = $("redirect");
    if (st.redirect_url) {
      redirect.href = st.redirect_url;
      redirect.parentElement.hidden = false;
    }
    $("received").textContent = st.received_label;
    card.dataset.updates = String(Number(card.dataset.updates || 0) + 1);
  }
  if (!window.EventSource) return;
  const source = new EventSource(card.dataset.events);
  source.addEventListener("state", (ev) => {
    try { apply(JSON.parse(ev.data)); } catch (e) { /* a malformed message changes nothing */ }
  });
  source.addEventListener("end", () => source.close());
})();

"""The checkout page's state and HTML: one pure function from an invoice (as the API shows it)
to what the customer sees, used by the page and by its live-status stream alike."""

from __future__ import annotations

import hashlib
import html
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import segno

from .catalog import text

STATIC = Path(__file__).parent / "static"
#: Seconds between refreshes of a page without JavaScript while it can still change.
NOSCRIPT_REFRESH = 15


def page_state(inv: dict[str, Any], lang: str, now_ms: int, uri: str) -> dict[str, Any]:
    """What the page shows of ``inv`` now: ``state`` (awaiting, partial, seen, confirming,
    paid, expired, failed, refunded), its label in ``lang``, ``final`` once nothing can change
    it any more (the live stream ends then), and while it can be paid the payment request
    ``uri`` (for what is due now) with its QR code. The headline amount (``amount_shown``) is
    what is due now while the invoice is partly paid: "Send exactly" must never name the
    whole amount again once part of it arrived."""
    status = inv["status"]
    asset = inv["asset"]
    counted = [p for p in inv["payments"] if p["counted"]]
    n = min((p["confirmations"] for p in counted), default=0)
    required = inv["required_confirmations"]
    monitor_over = _ms(inv["monitor_until"]) <= now_ms
    values: dict[str, Any] = {"asset": asset, "due": inv["due"], "n": n, "required": required}
    if status == "refunded" or (inv["refunds"] and inv["refunded_amount"] != "0"):
        state, final = "refunded", status in ("refunded", "completed", "failed") or monitor_over
    elif status == "completed":
        state, final = "paid", True
    elif status == "awaiting_confirmation":
        state, final = ("confirming" if n > 0 else "seen"), False
    elif status == "expired":
        state, final = "expired", monitor_over
    elif status == "failed":
        state, final = "failed", True
    elif inv["partial"]:
        state, final = "partial", False
    else:
        state, final = "awaiting", False
    return {
        "status": status, "state": state, "label": text(lang, f"status.{state}", **values), "final": final,
        "confirmations": n, "required": required, "due": inv["due"], "received": inv["received"],
        "amount": inv["amount"], "asset": asset,
        "amount_shown": inv["due"] if state == "partial" and inv["due"] else (inv["amount"] or ""),
        "received_label": text(lang, "received", received=inv["received"], amount=inv["amount"] or "", asset=asset),
        "redirect_url": inv.get("redirect_url") if state == "paid" else None,
        "payable": state in ("awaiting", "partial"),
        "lead": text(lang, "pay_exactly" if state in ("awaiting", "partial") else "amount_label"),
        "payment_uri": uri if state in ("awaiting", "partial") else None,
        "qr": qr_path(uri) if state in ("awaiting", "partial") else None,
    }


def _ms(iso: str | None) -> int:
    import datetime

    if iso is None:
        return 0
    return int(datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


@lru_cache(maxsize=1024)
def qr_path(data: str) -> dict[str, Any]:
    """The QR code of ``data`` (segno, error correction M, a 4-module quiet zone) as one SVG
    path: ``size`` modules square and its ``d``. The live stream sends it when the payment
    request changes (a partial payment leaves less to pay): the page sets two attributes,
    never HTML."""
    matrix = segno.make(data, error="m").matrix
    border = 4
    d = []
    for y, row in enumerate(matrix):
        x = 0
        while x < len(row):
            if row[x]:
                start = x
                while x < len(row) and row[x]:
                    x += 1
                d.append(f"M{start + border} {y + border}h{x - start}v1h-{x - start}z")
            else:
                x += 1
    return {"size": len(matrix) + 2 * border, "path": "".join(d)}


def qr_svg(data: str) -> str:
    """The QR code of ``data`` as inline SVG: presentation attributes only (no style
    attributes, so the strict CSP holds), scaled by CSS."""
    q = qr_path(data)
    n = q["size"]
    return (f'<svg class="qr-code" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {n} {n}" role="img">'
            f'<rect width="{n}" height="{n}" fill="#fff"/><path fill="#000" d="{q["path"]}"/></svg>')


@cache
def asset_version(name: str) -> str:
    """A short hash of a static file, for cache-busting its URL."""
    return hashlib.sha256((STATIC / name).read_bytes()).hexdigest()[:12]


def render_page(inv: dict[str, Any], lang: str, now_ms: int, uri: str, *, title: str | None) -> str:
    e = html.escape
    st = page_state(inv, lang, now_ms, uri)
    amount = inv["amount"] or ""
    asset = inv["asset"]
    price = inv.get("price")

    def t(key: str, **values: Any) -> str:
        return e(text(lang, key, **values))

    events = f"/pay/{inv['id']}/events?lang={lang}"
    refresh = "" if st["final"] else (
        f'<noscript><meta http-equiv="refresh" content="{NOSCRIPT_REFRESH}"></noscript>')
    hidden_pay = "" if st["payable"] else " hidden"
    redirect = st["redirect_url"]
    return f"""<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{t("title", amount=amount, asset=asset)}</title>
<link rel="stylesheet" href="/pay/static/checkout.css?v={asset_version("checkout.css")}">
<link rel="icon" href="/pay/static/favicon.svg?v={asset_version("favicon.svg")}" type="image/svg+xml">
<script src="/pay/static/checkout.js?v={asset_version("checkout.js")}" defer></script>
{refresh}
</head>
<body>
<main class="card" data-invoice="{e(inv["id"])}" data-events="{e(events)}" data-now="{now_ms}"
      data-copied="{t("copied")}">
<header>
<p class="shop">{e(title) if title else t("heading")}</p>
<p class="lead" data-field="lead">{e(st["lead"])}</p>
<p class="amount"><span data-field="amount">{e(st["amount_shown"])}</span> <span data-field="asset">{e(asset)}</span></p>
{f'<p class="price" data-field="price">{t("price", amount=price["amount"], currency=price["currency"])}</p>'
 if price else ""}
<p class="chain">{t("on_chain", chain=inv["chain"])}</p>
</header>
<section class="status">
<p class="badge state-{st["state"]}" data-field="status" data-status="{e(st["status"])}" data-state="{st["state"]}"
   role="status" aria-live="polite">{e(st["label"])}</p>
<p class="received" data-field="received">{e(st["received_label"])}</p>
<p class="redirect"{"" if redirect else " hidden"}><a data-field="redirect" class="button"
   href="{e(redirect or "")}">{t("back_to_shop")}</a></p>
</section>
<section class="pay" data-field="pay"{hidden_pay}>
<figure class="qr" aria-label="{t("qr_label")}" data-field="qr">{qr_svg(uri)}</figure>
<p><a class="button" data-field="payment-uri" href="{e(uri)}">{t("open_wallet")}</a></p>
<p class="label">{t("address")}</p>
<p class="address"><code data-field="address">{e(inv["address"])}</code>
<button type="button" class="copy" data-copy="address" hidden>{t("copy")}</button></p>
<p class="expiry">{t("expires_in")} <time data-field="expires" datetime="{e(inv["expires_at"])}">{
    e(inv["expires_at"].replace("T", " ")[:19])} UTC</time></p>
</section>
<noscript><p class="noscript">{t("noscript", seconds=NOSCRIPT_REFRESH)}
<a href="/pay/{e(inv["id"])}?lang={lang}">{t("refresh")}</a></p></noscript>
</main>
</body>
</html>
"""


def render_not_found(lang: str) -> str:
    e = html.escape
    return f"""<!doctype html>
<html lang="{lang}">
<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{e(text(lang, "not_found_title"))}</title>
<link rel="stylesheet" href="/pay/static/checkout.css?v={asset_version("checkout.css")}">
<link rel="icon" href="/pay/static/favicon.svg?v={asset_version("favicon.svg")}" type="image/svg+xml"></head>
<body><main class="card"><h1>{e(text(lang, "not_found_title"))}</h1><p>{e(text(lang, "not_found"))}</p></main></body>
</html>
"""

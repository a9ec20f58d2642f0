"""Every string the checkout page shows, by language: one catalog, English first. A language
is picked from ``?lang=`` or the browser's ``Accept-Language`` (q-values honoured), falling back
to English. A test checks that every language has every key of English and the same
``{placeholders}``."""

from __future__ import annotations

import re

CATALOG: dict[str, dict[str, str]] = {
    "en": {
        "title": "Pay {amount} {asset}",
        "heading": "Payment",
        "pay_exactly": "Send exactly",
        "amount_label": "Amount",
        "price": "Price: {amount} {currency}",
        "on_chain": "on {chain}",
        "address": "Address",
        "copy": "Copy",
        "copied": "Copied",
        "open_wallet": "Open in wallet",
        "qr_label": "QR code of the payment request",
        "expires_in": "Expires in",
        "expires_at": "Expires at",
        "refresh": "Refresh",
        "status.awaiting": "Awaiting payment",
        "status.partial": "Partially paid: send the remaining {due} {asset}",
        "status.seen": "Payment seen, waiting for confirmation",
        "status.confirming": "Payment seen: {n} of {required} confirmations",
        "status.paid": "Paid. Thank you!",
        "status.expired": "This payment request has expired",
        "status.failed": "The payment was not confirmed in time; please contact the shop",
        "status.refunded": "Refunded",
        "back_to_shop": "Back to the shop",
        "received": "Received {received} of {amount} {asset}",
        "not_found_title": "Payment not found",
        "not_found": "There is no payment request at this address. Check the link you were given.",
        "noscript": "This page updates itself when JavaScript is on; otherwise it refreshes every {seconds} seconds.",
    },
    "de": {
        "title": "{amount} {asset} bezahlen",
        "heading": "Zahlung",
        "pay_exactly": "Senden Sie genau",
        "amount_label": "Betrag",
        "price": "Preis: {amount} {currency}",
        "on_chain": "auf {chain}",
        "address": "Adresse",
        "copy": "Kopieren",
        "copied": "Kopiert",
        "open_wallet": "In der Wallet öffnen",
        "qr_label": "QR-Code der Zahlungsanforderung",
        "expires_in": "Läuft ab in",
        "expires_at": "Läuft ab um",
        "refresh": "Aktualisieren",
        "status.awaiting": "Warten auf Zahlung",
        "status.partial": "Teilweise bezahlt: senden Sie die restlichen {due} {asset}",
        "status.seen": "Zahlung erkannt, warten auf Bestätigung",
        "status.confirming": "Zahlung erkannt: {n} von {required} Bestätigungen",
        "status.paid": "Bezahlt. Vielen Dank!",
        "status.expired": "Diese Zahlungsanforderung ist abgelaufen",
        "status.failed": "Die Zahlung wurde nicht rechtzeitig bestätigt; bitte wenden Sie sich an den Shop",
        "status.refunded": "Erstattet",
        "back_to_shop": "Zurück zum Shop",
        "received": "Erhalten: {received} von {amount} {asset}",
        "not_found_title": "Zahlung nicht gefunden",
        "not_found": "Unter dieser Adresse gibt es keine Zahlungsanforderung. Prüfen Sie den erhaltenen Link.",
        "noscript": "Mit JavaScript aktualisiert sich diese Seite selbst, sonst alle {seconds} Sekunden.",
    },
}

LANGUAGES = tuple(CATALOG)
_TAG = re.compile(r"^[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*$")


def pick_language(accept_language: str | None, override: str | None = None) -> str:
    """The best language we have for ``Accept-Language`` (``de-CH, de;q=0.9, en;q=0.8``),
    or ``override`` when it names one we have."""
    if override in CATALOG:
        assert override is not None
        return override
    best, best_q = "en", -1.0
    for i, part in enumerate((accept_language or "")[:512].split(",")[:32]):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        if not tag or (tag != "*" and not _TAG.match(tag)):
            continue
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        primary = tag.split("-")[0]
        if primary in CATALOG and q > best_q and q > 0:
            best, best_q = primary, q - i * 1e-6  # equal q: the first listed wins
    return best


def text(lang: str, key: str, **values: object) -> str:
    template = CATALOG.get(lang, CATALOG["en"]).get(key) or CATALOG["en"][key]
    return template.format(**values) if values else template

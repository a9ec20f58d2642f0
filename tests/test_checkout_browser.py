"""The checkout page in a real headless Chromium: the marked fields, the QR code decoded back
(zbarimg) to the invoice's payment URI, nothing loaded from outside the daemon, and the status
turning to paid without a reload when the invoice is paid on anvil; partial, expired and the
second language; a phone-sized layout. Screenshots go to the test's temp dir, or to
``WATCHER_SCREENSHOTS`` (``make screenshots`` refreshes docs/screenshots)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from tests.support import browser as br
from tests.support.daemon import wait_until
from tests.support.evm import Anvil, Token
from tests.test_checkout import checkout_config, clients

pytestmark = pytest.mark.skipif(br.available() is not None and not os.environ.get("WATCHER_REQUIRE_BROWSER"),
                                reason=str(br.available()))


def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("WATCHER_SCREENSHOTS") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


def field(driver, name: str):
    return driver.find_element("css selector", f'[data-field="{name}"]')


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def wait_page(driver, predicate, *, timeout: float = 8.0, what: str = "page state"):
    # generous (the page follows an event in ~10 ms, bench 9), yet below the stream's 15 s
    # keep-alive: a change that did not wake the page's stream fails
    return await wait_until(lambda: predicate(driver), timeout=timeout, interval=0.1, what=what)


async def test_pay_in_a_real_browser_turns_paid_without_reload(tmp_path, anvil: Anvil):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil, title="Example shop")
    api, pay = clients(api_port, pay_port)
    anvil.automine(False)
    out = shots(tmp_path)
    async with running_daemon(cfg) as d, api, pay:
        r = await api.post("/v1/invoices", json={"chain": "devnet", "asset": "ETH", "amount": "0.0421",
                                                 "order_id": "order-1001",
                                                 "redirect_url": "https://shop.example/orders/1001"})
        inv = r.json()
        origin = f"http://127.0.0.1:{pay_port}"
        with br.browser() as driver:
            await in_thread(driver.get, inv["checkout_url"])
            await wait_page(driver, lambda dr: dr.execute_script(
                "return document.querySelector('main').dataset.updates") is not None, what="the stream's first state")
            assert field(driver, "amount").text == "0.0421" and field(driver, "asset").text == "ETH"
            assert field(driver, "address").text == inv["address"]
            assert field(driver, "payment-uri").get_attribute("href") == inv["payment_uri"]
            status = field(driver, "status")
            assert status.get_attribute("data-status") == "awaiting_payment" and status.text == "Awaiting payment"
            assert field(driver, "expires").get_attribute("datetime") == inv["expires_at"]
            assert ":" in field(driver, "expires").text  # the countdown runs (m:ss)
            # the QR code, as the customer's phone sees it, is the payment URI
            png = await in_thread(lambda: field(driver, "qr").screenshot_as_png)
            assert br.decode_qr(png) == [inv["payment_uri"]]
            driver.save_screenshot(str(out / "checkout-awaiting.png"))
            # everything the page loaded came from the daemon itself
            urls = br.requested_urls(driver)
            assert urls and all(u.startswith(origin + "/pay/") for u in urls), urls
            assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]  # no CSP violation

            driver.execute_script("window.__sameDocument = 'yes'")  # gone if the page reloads
            anvil.send(anvil.accounts[1], inv["address"], 42_100_000_000_000_000)
            anvil.mine(1)
            await wait_page(driver, lambda dr: field(dr, "status").get_attribute("data-status")
                            == "awaiting_confirmation", what="payment seen")
            anvil.mine(1)
            await wait_page(driver, lambda dr: field(dr, "status").get_attribute("data-status") == "completed",
                            what="paid")
            assert driver.execute_script("return window.__sameDocument") == "yes"
            assert driver.execute_script("return performance.getEntriesByType('navigation').length") == 1
            assert field(driver, "status").text == "Paid. Thank you!" and field(driver, "lead").text == "Amount"
            assert not field(driver, "pay").is_displayed()
            redirect = field(driver, "redirect")
            assert redirect.is_displayed() and redirect.get_attribute("href") == "https://shop.example/orders/1001"
            driver.save_screenshot(str(out / "checkout-paid.png"))
            assert all(u.startswith(origin + "/pay/") for u in br.requested_urls(driver))
        assert d.views.invoice(inv["id"])["status"] == "completed"


async def test_partial_expired_german_and_phone_layout(tmp_path, anvil: Anvil, token: Token):
    cfg, api_port, pay_port = checkout_config(tmp_path, anvil, token, title="Example shop")
    token.mint(anvil.accounts[1], 10**12)
    api, pay = clients(api_port, pay_port)
    out = shots(tmp_path)
    async with running_daemon(cfg) as d, api, pay:
        inv = (await api.post("/v1/invoices", json={"chain": "devnet", "asset": "USDT", "amount": "25"})).json()
        with br.browser(size=br.MOBILE, lang="de-DE") as driver:
            await in_thread(driver.get, inv["checkout_url"])
            await wait_page(driver, lambda dr: dr.execute_script(
                "return document.querySelector('main').dataset.updates") is not None, what="first state")
            assert driver.find_element("tag name", "html").get_attribute("lang") == "de"
            assert field(driver, "status").text == "Warten auf Zahlung"
            # the phone layout: no horizontal scrolling, the QR code fits the screen
            width = driver.execute_script("return document.documentElement.clientWidth")
            assert driver.execute_script("return document.documentElement.scrollWidth") <= width
            assert field(driver, "qr").size["width"] <= width
            png = await in_thread(lambda: field(driver, "qr").screenshot_as_png)
            assert br.decode_qr(png) == [inv["payment_uri"]]
            driver.save_screenshot(str(out / "checkout-mobile-de.png"))

            token.transfer(anvil.accounts[1], inv["address"], 10_000_000)
            anvil.mine(1)
            await wait_page(driver, lambda dr: field(dr, "status").get_attribute("data-state") == "partial",
                            what="partial")
            assert field(driver, "status").text == "Teilweise bezahlt: senden Sie die restlichen 15 USDT"
            assert field(driver, "pay").is_displayed()  # still payable: the rest can be sent
            assert (field(driver, "lead").text, field(driver, "amount").text) == ("Senden Sie genau", "15")
            # the link and the QR code now ask for the rest (15 USDT), not the whole amount again
            rest = inv["payment_uri"].replace("uint256=25000000", "uint256=15000000")
            assert rest != inv["payment_uri"] and field(driver, "payment-uri").get_attribute("href") == rest
            png = await in_thread(lambda: field(driver, "qr").screenshot_as_png)
            assert br.decode_qr(png) == [rest]
            driver.save_screenshot(str(out / "checkout-partial-de.png"))

        # an invoice that expires while its page is open (store-made: the API's minimum is 60 s)
        row = d.store.invoices.create(chain="devnet", asset="USDT", amount=5_000_000, mode="sale", expires_in=3,
                                      tolerance_ppm=0, order_id=None, metadata={}, actor="t")
        url = d.views.invoice(row.id)["checkout_url"]
        with br.browser() as driver:
            await in_thread(driver.get, url)
            await wait_page(driver, lambda dr: field(dr, "status").get_attribute("data-status") == "expired",
                            what="expired", timeout=12)  # expires 3 s after creation
            assert field(driver, "status").text == "This payment request has expired"
            assert not field(driver, "pay").is_displayed()
            assert driver.execute_script("return performance.getEntriesByType('navigation').length") == 1
            driver.save_screenshot(str(out / "checkout-expired.png"))

            # unknown invoice: the plain 404 page
            await in_thread(driver.get, f"http://127.0.0.1:{pay_port}/pay/inv_00000000000000000000000000")
            assert driver.find_element("tag name", "h1").text == "Payment not found"


def running_daemon(cfg):
    from tests.support.daemon import running

    return running(cfg, api=True)

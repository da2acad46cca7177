"""The web console in a real browser: Debian's chromium driven by Playwright, against
the console and the three services as real processes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc.dev.testing import ServiceProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.async_api import Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev extra installs it
    async_playwright = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or async_playwright is None,
    reason="needs chromium (apt-get install chromium) and playwright (the dev extra) for the browser test",
)
LONG_MS = 30_000  # recovery after a crash: restart, then the shop's next Commit retry


@pytest.fixture
def console(tmp_path: Path) -> Iterator[ServiceProcess]:
    """`python -m services.console --demo` on a free port, with its services."""
    proc = ServiceProcess(
        "services.console", ["--demo", "--workdir", str(tmp_path / "console")], log_path=tmp_path / "console.log"
    )
    proc.start(timeout_s=60)
    yield proc
    proc.stop(timeout_s=20)


async def buy(page: Page, account: str, **items: int) -> None:
    await page.select_option("#buyer", account)
    for sku in ("widget", "gadget", "gizmo", "lamp"):
        await page.fill(f'input[data-sku="{sku}"]', str(items.get(sku, 0)))
    await page.click("#buy-button")
    await expect(page.locator("#result .outcome")).to_be_visible()


async def test_buy_watch_crash_and_recover_in_a_browser(console: ServiceProcess, tmp_path: Path) -> None:
    """A purchase commits with both votes shown; one fails for funds with the reason; one
    whose Prepare reply is dropped aborts; one whose order service is killed after its
    yes vote completes after the restart; the balances shown are the wallet's own; the
    invariants hold; a screenshot is saved."""
    assert async_playwright is not None and CHROMIUM is not None
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = await browser.new_page(viewport={"width": 1400, "height": 1000})
        await page.goto(f"http://{console.address}/")
        await expect(page.locator('#buyers tr[data-account="alice"] .balance')).to_have_text("100.00")
        await expect(page.locator("#demo-banner")).to_be_visible()

        await buy(page, "alice", widget=2)
        await expect(page.locator("#result .outcome")).to_have_text("COMMITTED")
        await expect(page.locator('#result .branch[data-branch="wallet"] .vote')).to_have_text("commit")
        await expect(page.locator('#result .branch[data-branch="orders"] .vote')).to_have_text("commit")
        first = await page.locator("#result").get_attribute("data-txn")
        await expect(page.locator(f'#txns li[data-txn="{first}"]')).to_have_attribute("data-ended", "true")

        await buy(page, "bob", widget=1)  # 15.00 against 3.00
        await expect(page.locator("#result .outcome")).to_have_text("ABORTED")
        await expect(page.locator("#result .reason")).to_contain_text("insufficient funds")

        await page.click('[data-fault="drop-next-reply:shop"]')
        await expect(page.locator("#fault-result")).to_contain_text("lose the next reply")
        await buy(page, "alice", gizmo=1)
        await expect(page.locator("#result .outcome")).to_have_text("ABORTED")
        await expect(page.locator("#result .reason")).to_contain_text("lost")

        await page.click('[data-fault="kill-after-vote:orders"]')
        await expect(page.locator("#fault-result")).to_contain_text("armed")
        await buy(page, "carol", gadget=1)
        await expect(page.locator("#result .outcome")).to_have_text("COMMITTED", timeout=LONG_MS)
        txn = await page.locator("#result").get_attribute("data-txn")
        await expect(page.locator('#notes li[data-note="crashed:orders"]')).to_have_count(1, timeout=LONG_MS)
        await expect(page.locator('#notes li[data-note="restarted:orders"]')).to_have_count(1, timeout=LONG_MS)
        row = page.locator(f'#txns li[data-txn="{txn}"]')
        await expect(row).to_have_attribute("data-ended", "true", timeout=LONG_MS)
        await expect(row).to_have_attribute("data-status", "committed")
        await row.locator(".head").click()
        await expect(row.locator(".timeline")).to_contain_text("orders restarted")
        await expect(row.locator(".timeline")).to_contain_text("phase2 retry")

        wallet = (await page.locator('#services li[data-service="wallet"] .addr').text_content() or "").strip()
        async with grpc.aio.insecure_channel(wallet) as ch:
            stub = wallet_pb2_grpc.WalletStub(ch)
            for account in ("alice", "bob", "carol"):
                own = await stub.GetBalance(wallet_pb2.GetBalanceRequest(account=account), timeout=5)
                cells = page.locator(f'#buyers tr[data-account="{account}"]')
                await expect(cells.locator(".balance")).to_have_text(f"{own.balance / 100:.2f}")
                await expect(cells.locator(".held")).to_have_text(f"{own.held / 100:.2f}")

        for sku, on_hand in (("widget", 8), ("gadget", 4)):  # read again from the restarted order service
            await expect(page.locator(f'#products tr[data-sku="{sku}"] .on-hand')).to_have_text(str(on_hand))
        await page.click("#check")
        await expect(page.locator("#invariants [data-ok]")).to_have_attribute("data-ok", "true", timeout=LONG_MS)
        shot = tmp_path / "console.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if target := os.environ.get("TWOPC_CONSOLE_SCREENSHOT"):  # how docs/console.png is made
            shutil.copy(shot, target)
        await browser.close()

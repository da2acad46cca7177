"""The README's coordinator example runs exactly as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.order.v1 import order_pb2, order_pb2_grpc
from services.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from twopc.dev.testing import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using the coordinator in your service", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README lost its coordinator example"
    return match.group(1)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    wallet = ServiceProcess(
        "services.wallet", ["--db", str(tmp_path / "w.db"), "--insecure"], log_path=tmp_path / "w.log"
    )
    orders = ServiceProcess(
        "services.order", ["--db", str(tmp_path / "o.db"), "--insecure"], log_path=tmp_path / "o.log"
    )
    yield wallet.start(), orders.start()
    wallet.stop()
    orders.stop()


async def test_readme_example_runs_as_written(tmp_path: Path, services: tuple[ServiceProcess, ServiceProcess]) -> None:
    """The example commits a purchase, and a second run of it aborts with the reason."""
    wallet, orders = services
    async with grpc.aio.insecure_channel(wallet.address) as w, grpc.aio.insecure_channel(orders.address) as o:
        await wallet_pb2_grpc.WalletStub(w).OpenAccount(wallet_pb2.OpenAccountRequest(account="alice"), timeout=5)
        await wallet_pb2_grpc.WalletStub(w).Deposit(
            wallet_pb2.DepositRequest(account="alice", amount=10_000), timeout=5
        )
        await order_pb2_grpc.OrdersStub(o).AddStock(
            order_pb2.AddStockRequest(sku="widget", quantity=5, unit_price=1_500), timeout=5
        )
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {**os.environ, "WALLET": wallet.address, "ORDERS": orders.address, "OUTCOME": "127.0.0.1:0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))

    def run() -> str:
        done = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert run() == "committed"
    again = run()  # the same order id again: the order service refuses a second order
    assert again.startswith("aborted ") and again.endswith("order 'o-42' is already confirmed"), again


def test_import_twopc_alone_reaches_the_modules_and_hides_debug_events() -> None:
    """`import twopc` gives `twopc.observe.logconfig` and `twopc.rpc` without importing them, and a
    process that configures no logging prints no debug event, on stdout or stderr."""
    script = (
        "import twopc, structlog\n"
        "assert callable(twopc.observe.logconfig.configure) and callable(twopc.rpc.server)\n"
        "structlog.get_logger('probe').debug('hidden_event')\n"
        "structlog.get_logger('probe').info('shown_event')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "shown_event" in done.stderr and "hidden_event" not in done.stderr


def test_every_twopc_name_the_docs_use_exists() -> None:
    """Every `from twopc... import ...` in the README's and docs' code, and every dotted
    `twopc.x.y` they name in backticks, imports or resolves (moved paths break here)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in pages)
    imports = sorted(set(re.findall(r"^\s*(from twopc[\w.]* import [\w, ]+)$", text, re.MULTILINE)))
    spans = {"twopc.transaction", "twopc.phase1", "twopc.phase2", "twopc.prepare", "twopc.commit", "twopc.abort"}
    spans |= {"twopc.decision_write"}  # OpenTelemetry span names (docs/operations.md), not modules
    dotted = sorted(set(re.findall(r"`(twopc(?:\.[A-Za-z_]\w*)+)", text)) - spans)
    script = "\n".join(
        [
            "import importlib",
            *imports,
            "missing = []",
            f"for name in {[d for d in dotted if not d.startswith('twopc.v1.')]!r}:",
            "    parts = name.split('.')",
            "    for i in range(len(parts), 0, -1):",
            "        try:",
            "            obj = importlib.import_module('.'.join(parts[:i]))",
            "        except ImportError:",
            "            continue",
            "        try:",
            "            for attr in parts[i:]:",
            "                obj = getattr(obj, attr)",
            "        except AttributeError:",
            "            missing.append(name)",
            "        break",
            "    else:",
            "        missing.append(name)",
            "assert not missing, missing",
        ]
    )
    assert imports and dotted
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr

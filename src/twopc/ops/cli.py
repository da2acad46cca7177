"""`twopc`: the operator's command, against real decision logs, stores and servers.

    twopc log list shop.db                  commits not yet acknowledged by everyone
    twopc log show shop.db TXN              one logged decision
    twopc participant in-doubt wallet.db    transactions prepared here, not decided

A decision log or a participant's store is a SQLite file or a PostgreSQL URL
(`postgresql://host/db?schema=shop_log` for a shared log; a participant's URL as it
was given to `--db`), read in one read-only snapshot.
    twopc outcome TXN --coordinator ADDR    what the coordinator's GetOutcome says
    twopc resolve TXN --db wallet.db --handler services.wallet.service:WalletHandler --abort
    twopc resolve TXN --db postgresql://... --abort   (the PREPARE TRANSACTION adapter)
    twopc coordinator --config coordinator.toml   the coordinator as a service (Transactions/Execute)

Tables for people by default, `--json` for scripts. An error is one line on standard
error and a non-zero exit status. Needs the `ops` extra (`pip install twopc[ops]`).

`resolve` is the heuristic decision of last resort, for the day a coordinator's log
is lost: it applies COMMIT or ABORT to one prepared transaction at one participant,
running that participant's own handler in the same local transaction as the state
change (for the adapter: COMMIT or ROLLBACK PREPARED, as the adapter does), and
records it in the participant's `twopc_heuristic` table (and the log) so that
invariant checkers report it as heuristic. It refuses while the coordinator still
answers COMMITTED or PENDING (it will deliver the decision itself) unless `--force`,
and asks for confirmation unless `--yes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
import grpc
import structlog

from twopc import stores
from twopc.config import Credentials
from twopc.errors import TwoPCError
from twopc.observe.logconfig import configure as configure_logs
from twopc.participant import table, trust
from twopc.participant.admission import DecisionRefused
from twopc.participant.table import ABORTED, COMMITTED, PREPARED
from twopc.stores.base import POSTGRES_SCHEMES
from twopc.v1 import coordinator_pb2, coordinator_pb2_grpc

_log = structlog.get_logger("twopc.ops.cli")

HEURISTIC_SCHEMA = """
CREATE TABLE IF NOT EXISTS twopc_heuristic (
    txn_id       TEXT PRIMARY KEY,
    decision     TEXT NOT NULL CHECK (decision IN ('COMMITTED', 'ABORTED')),
    coordinator  TEXT NOT NULL,   -- what the coordinator answered, or why it could not
    forced       INTEGER NOT NULL,
    operator     TEXT NOT NULL,
    at           DOUBLE PRECISION NOT NULL
);
"""


class CliError(click.ClickException):
    """One line on standard error, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"twopc: error: {self.format_message()}", err=True)


def fail(message: str) -> NoReturn:
    raise CliError(message)


def _json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")(f)


def emit(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool, *, empty: str) -> None:
    """Prints `rows` as a JSON list or as an aligned table of `columns`."""
    if as_json:
        click.echo(json.dumps(list(rows), indent=1))
        return
    if not rows:
        click.echo(empty)
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


@contextlib.contextmanager
def _open(path: str, *, write: bool = False) -> Iterator[sqlite3.Connection]:
    """A store's SQLite file, read-only unless `write`; refuses PostgreSQL URLs and
    paths that do not exist (SQLite would create an empty file)."""
    if "://" in path:
        fail(f"{path.split('://')[0]} URLs are not supported by this command; give the SQLite file's path")
    if not Path(path).is_file():
        fail(f"no such file: {path}")
    uri = f"file:{os.fspath(path)}{'' if write else '?mode=ro'}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10.0)
    try:
        yield conn
    except sqlite3.Error as e:
        fail(f"{path}: {e}")
    finally:
        conn.close()


def _read(where: str, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One read-only query (`:name` parameters) against a SQLite file or a PostgreSQL
    URL, errors as one line."""
    if not where.startswith(POSTGRES_SCHEMES):
        with _open(where) as db:
            return [tuple(row) for row in db.execute(sql, params)]
    try:
        return stores.query(where, sql, **params)
    except ImportError:
        fail("PostgreSQL needs the postgres extra: pip install 'twopc[postgres]'")
    except Exception as e:  # noqa: BLE001 - a driver's error, said in one line
        fail(f"{where.split('@')[-1]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Look into and settle twopc transactions: decision logs, participants' stores,
    coordinators."""


# --- twopc log -------------------------------------------------------------------------


@cli.group("log")
def log_group() -> None:
    """A coordinator's decision log (its SQLite file, or a shared log's PostgreSQL URL)."""


def _decisions(log: str, where: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    """COMMIT records of a SQLite log or a shared PostgreSQL one (`where` is a SQL
    condition over txn_id and ended, the same for both)."""
    if log.startswith(POSTGRES_SCHEMES):
        from twopc.decisions.postgres import connection_info  # the postgres extra

        url, schema = connection_info(log)
        sql = (
            "SELECT txn_id, targets::text, extract(epoch FROM logged_at), extract(epoch FROM ended_at), driver"
            f" FROM (SELECT *, ended_at IS NOT NULL AS ended FROM {schema}.decisions WHERE decision = 'commit') d"
            f" WHERE {where} ORDER BY logged_at"
        )
        rows = _read(url, sql, params)
    else:
        sql = (
            "SELECT txn_id, targets, logged_at, ended_at, '' FROM"
            f" (SELECT *, ended_at IS NOT NULL AS ended FROM decisions) WHERE {where} ORDER BY logged_at"
        )
        rows = _read(log, sql, params)
    now = time.time()
    return [
        {
            "txn_id": t,
            "state": "ended" if ended is not None else "pending",
            "age_s": round(now - float(logged), 3),
            "branches": json.loads(targets),
            "acknowledged": "all" if ended is not None else "not all",
            "logged_at": float(logged),
            "ended_at": None if ended is None else float(ended),
            **({"driver": driver} if driver else {}),
        }
        for t, targets, logged, ended, driver in rows
    ]


@log_group.command("list")
@click.argument("log", metavar="LOG")
@click.option("--all", "everything", is_flag=True, help="also ended (fully acknowledged) commits")
@_json_option
def log_list(log: str, everything: bool, as_json: bool) -> None:
    """Logged COMMIT decisions not yet acknowledged by every participant (pending)."""
    rows = _decisions(log, "TRUE" if everything else "NOT ended", {})
    emit(rows, _log_columns(rows), as_json, empty="no pending commits")


@log_group.command("show")
@click.argument("log", metavar="LOG")
@click.argument("txn_id", metavar="TXN")
@_json_option
def log_show(log: str, txn_id: str, as_json: bool) -> None:
    """One transaction's record; a transaction with none was aborted (presumed abort)."""
    rows = _decisions(log, "txn_id = :txn_id", {"txn_id": txn_id})
    if not rows:
        fail(f"{txn_id} is not in the log: aborted (presumed abort), or purged after its retention")
    emit(rows, _log_columns(rows), as_json, empty="")


def _log_columns(rows: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """A shared log's rows say which instance delivers each commit (`driver`)."""
    columns = ("txn_id", "state", "age_s", "branches", "acknowledged")
    return (*columns, "driver") if any("driver" in r for r in rows) else columns


# --- twopc participant -----------------------------------------------------------------


@cli.group("participant")
def participant_group() -> None:
    """A participant's store (its SQLite file or PostgreSQL URL)."""


@participant_group.command("in-doubt")
@click.argument("store", metavar="STORE")
@click.option("--older-than-s", type=float, default=0.0, show_default=True, help="only those prepared this long ago")
@_json_option
def in_doubt(store: str, older_than_s: float, as_json: bool) -> None:
    """Transactions prepared here and not yet decided, oldest first: reservations
    (the helper) and PostgreSQL prepared transactions (the adapter) alike."""
    now = time.time()
    found = _in_doubt(store, now - older_than_s)
    rows = []
    for x in found:
        addresses, log_id = trust.whom_to_ask(x.coordinator)  # the owner's log id is kept beside them
        age_s = round(now - x.prepared_at, 3)
        rows.append(
            {"txn_id": x.txn_id, "age_s": age_s, "coordinator": " ".join(addresses), "log": log_id, "gid": x.gid}
        )
    emit(rows, ("txn_id", "age_s", "coordinator"), as_json, empty="nothing in doubt")


def _in_doubt(store: str, cutoff: float) -> list[table.InDoubt]:
    """The participant's own in-doubt query (`twopc.participant.table.in_doubt`), on
    a read-only snapshot of its store, errors as one line."""
    if not store.startswith(POSTGRES_SCHEMES):
        with _open(store) as db:
            return table.in_doubt(db, cutoff)
    try:
        with stores.snapshot(store) as db:
            return table.in_doubt(db, cutoff)
    except ImportError:
        fail("PostgreSQL needs the postgres extra: pip install 'twopc[postgres]'")
    except Exception as e:  # noqa: BLE001 - a driver's error, said in one line
        fail(f"{store.split('@')[-1]}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


# --- twopc outcome ---------------------------------------------------------------------


def _tls_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--tls-key", type=click.Path(exists=True), help="client key (mutual TLS)")(f)
    f = click.option("--tls-cert", type=click.Path(exists=True), help="client certificate (mutual TLS)")(f)
    return click.option("--tls-ca", type=click.Path(exists=True), help="CA that signed the coordinator's certificate")(
        f
    )


def _credentials(ca: str | None, cert: str | None, key: str | None) -> Credentials:
    if ca is None:
        return Credentials.insecure()
    if cert is not None and key is not None:  # mutual TLS, the way every twopc process loads it
        return Credentials.mutual_tls(cert, key, ca)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return Credentials(channel=grpc.ssl_channel_credentials(read(ca), read(key), read(cert)), server=None)


def ask_outcome(txn_id: str, coordinator: str, credentials: Credentials, timeout_s: float) -> str:
    """COMMITTED, ABORTED or PENDING, from the coordinator's GetOutcome.

    Raises:
        grpc.aio.AioRpcError: the coordinator did not answer.
    """
    from twopc import rpc

    async def ask() -> str:
        async with rpc.channel(coordinator, credentials) as ch:
            reply = await coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome(
                coordinator_pb2.GetOutcomeRequest(txn_id=txn_id), timeout=timeout_s
            )
        return str(coordinator_pb2.Outcome.Name(reply.outcome)).removeprefix("OUTCOME_")

    return asyncio.run(ask())


@cli.command()
@click.argument("txn_id", metavar="TXN")
@click.option("--coordinator", required=True, metavar="HOST:PORT", help="the coordinator's GetOutcome address")
@click.option("--timeout-s", type=float, default=5.0, show_default=True, help="deadline of the call")
@_tls_options
@_json_option
def outcome(
    txn_id: str,
    coordinator: str,
    timeout_s: float,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    as_json: bool,
) -> None:
    """What the coordinator says about TXN: COMMITTED, ABORTED or PENDING."""
    from twopc import rpc

    try:
        answer = ask_outcome(txn_id, coordinator, _credentials(tls_ca, tls_cert, tls_key), timeout_s)
    except grpc.aio.AioRpcError as e:
        fail(f"{coordinator} did not answer: {rpc.describe(e)}")
    if as_json:
        click.echo(json.dumps({"txn_id": txn_id, "outcome": answer}))
    else:
        click.echo(answer)


# --- twopc coordinator -----------------------------------------------------------------


@cli.command("coordinator")
@click.option("--config", "config_path", required=True, type=click.Path(), help="the TOML configuration file")
@click.option("--host", help="the address Execute, GetOutcome and health listen on (overrides `listen`'s)")
@click.option(
    "--port",
    type=int,
    help="their port (overrides `listen`'s; 0 for any free one). Keep a stable port outside the ephemeral"
    " range (/proc/sys/net/ipv4/ip_local_port_range, 32768-60999 on Linux by default): participants in"
    " doubt ask this address after a restart, and an ephemeral one may be taken by an outgoing connection.",
)
@click.option("--log", "log", metavar="PATH|URL", help="the decision log: SQLite path or postgresql://...?schema=")
@click.option("--metrics-host", help="address of /metrics, /healthz and /readyz (default 127.0.0.1)")
@click.option("--metrics-port", type=int, help="port of /metrics, /healthz and /readyz (default: none)")
@click.option("--log-format", type=click.Choice(["console", "json"]), default="console", show_default=True)
def coordinator(
    config_path: str,
    host: str | None,
    port: int | None,
    log: str | None,
    metrics_host: str | None,
    metrics_port: int | None,
    log_format: str,
) -> None:
    """Run the coordinator as a service: twopc.v1.Transactions/Execute for clients in
    any language, GetOutcome for participants in doubt, and gRPC health, on one port.

    The file says which decision log, TLS files, who may execute, which participants
    it may dial (with their identities) and the metrics port (docs/coordinator-service.md).
    Runs until SIGTERM or SIGINT; prints READY HOST:PORT once serving.
    """
    from twopc.ops import coordinatord

    try:
        config = coordinatord.load(
            config_path, host=host, port=port, log=log, metrics_host=metrics_host, metrics_port=metrics_port
        )
    except coordinatord.ConfigError as e:
        fail(str(e))
    configure_logs("json" if log_format == "json" else "console", level="info", stream=sys.stderr)
    try:
        asyncio.run(coordinatord.run(config))
    except (OSError, ValueError) as e:  # a port in use, a bad log URL: one line
        fail(str(e))
    except TwoPCError as e:
        fail(f"{e}: stopping so that a restart recovers from the log")


# --- twopc resolve ---------------------------------------------------------------------


def load_handler(spec: str) -> Any:
    """`module:Class` -> an instance of the participant's handler."""
    module, _, name = spec.partition(":")
    if not module or not name:
        fail(f"--handler takes module:Class, got {spec!r}")
    try:
        return getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, TypeError) as e:
        fail(f"cannot load handler {spec}: {e}")


def _record_heuristic(db: Any, txn_id: str, decision: str, coordinator_said: str, *, forced: bool) -> None:
    """Inserts the heuristic decision's record (who, when, what the coordinator said)."""
    stores.execute(
        db,
        "INSERT INTO twopc_heuristic VALUES (:t, :decision, :said, :forced, :operator, :now)",
        {
            "t": txn_id,
            "decision": decision,
            "said": coordinator_said,
            "forced": int(forced),
            "operator": os.environ.get("USER") or os.environ.get("LOGNAME") or str(os.getuid()),
            "now": time.time(),
        },
    )


def _on_postgres(store: str, job: Callable[[Any], None], *, autocommit: bool = False) -> None:
    """Runs `job` once on a `PostgresStore` of `store` with the heuristic table."""

    async def run() -> None:
        from twopc.stores.postgres import PostgresStore

        pg = PostgresStore(store, HEURISTIC_SCHEMA, autocommit=autocommit)
        await pg.open()
        try:
            await pg.write(job)
        finally:
            await pg.close()

    try:
        asyncio.run(run())
    except ImportError:
        fail("PostgreSQL needs the postgres extra: pip install 'twopc[postgres]'")


def apply_heuristic(
    store: str, handler: Any, txn_id: str, decision: str, coordinator_said: str, *, forced: bool
) -> None:
    """Applies `decision` to a prepared transaction in one local transaction: the
    handler's commit or abort, the state change, and the heuristic record. The same
    SQL on a SQLite file (written beside a running participant: SQLite's lock
    serializes the two) and on a PostgreSQL store (through `PostgresStore`)."""

    def decide(db: Any) -> None:
        stores.lock_rows(db, "twopc_txn", "txn_id", [txn_id])  # a running participant's Commit/Abort waits
        row = stores.execute(db, "SELECT state FROM twopc_txn WHERE txn_id = :t", {"t": txn_id}).fetchone()
        if row is None or row[0] != PREPARED:
            fail(f"{txn_id} is {'unknown' if row is None else row[0]} here, not PREPARED: nothing to resolve")
        (handler.commit if decision == COMMITTED else handler.abort)(db, txn_id)
        stores.execute(
            db,
            "UPDATE twopc_txn SET state = :state, decided_at = :now WHERE txn_id = :t",
            {"state": decision, "now": time.time(), "t": txn_id},
        )
        _record_heuristic(db, txn_id, decision, coordinator_said, forced=forced)

    if store.startswith(POSTGRES_SCHEMES):
        _on_postgres(store, decide)
        return
    with _open(store, write=True) as db:
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(HEURISTIC_SCHEMA)
        db.execute("BEGIN IMMEDIATE")
        try:
            decide(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


def apply_prepared_heuristic(store: str, txn_id: str, decision: str, coordinator_said: str, *, forced: bool) -> None:
    """Applies `decision` to a transaction the PREPARE TRANSACTION adapter holds:
    COMMIT PREPARED or ROLLBACK PREPARED with the adapter's own code
    (`twopc.participant.prepared`: the outcome row travels with the work; an abort
    leaves its tombstone), then the heuristic record."""

    def decide(db: Any) -> None:
        from twopc.participant import prepared

        settle = prepared.commit_prepared if decision == COMMITTED else prepared.rollback_prepared
        try:
            changed = settle(db, txn_id)
        except DecisionRefused as e:
            fail(str(e))
        if not changed:
            fail(f"{txn_id} was decided meanwhile ({decision} already): nothing to resolve")
        db.exec_driver_sql("BEGIN")
        _record_heuristic(db, txn_id, decision, coordinator_said, forced=forced)
        db.exec_driver_sql("COMMIT")

    _on_postgres(store, decide, autocommit=True)


@cli.command()
@click.argument("txn_id", metavar="TXN")
@click.option("--db", "store", required=True, metavar="STORE", help="the participant's SQLite file or PostgreSQL URL")
@click.option(
    "--handler",
    metavar="MODULE:CLASS",
    help="the helper participant's handler, whose commit/abort runs (not for the PREPARE TRANSACTION adapter)",
)
@click.option("--commit", "decision", flag_value=COMMITTED, help="apply the reservation")
@click.option("--abort", "decision", flag_value=ABORTED, help="release the reservation")
@click.option("--coordinator", metavar="HOST:PORT", help="ask this coordinator (default: the one that prepared it)")
@click.option("--force", is_flag=True, help="decide even though the coordinator says COMMITTED or PENDING")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--timeout-s", type=float, default=5.0, show_default=True, help="deadline of GetOutcome")
@_tls_options
def resolve(
    txn_id: str,
    store: str,
    handler: str | None,
    decision: str | None,
    coordinator: str | None,
    force: bool,
    yes: bool,
    timeout_s: float,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Heuristically commit or abort TXN at one participant (last resort).

    The coordinator is asked first: while it answers COMMITTED or PENDING it will
    settle the transaction itself, and deciding here could break atomicity, so this
    refuses unless --force. The decision is recorded as heuristic in the store's
    twopc_heuristic table.
    """
    from twopc import rpc

    if decision is None:
        fail("say --commit or --abort")
    held = next((x for x in _in_doubt(store, time.time() + 86_400.0) if x.txn_id == txn_id), None)
    if held is None:
        found = _read(store, "SELECT state FROM twopc_txn WHERE txn_id = :t", {"t": txn_id})
        state = found[0][0] if found else "unknown"
        fail(f"{txn_id} is {state} at {store}, not {PREPARED}: nothing to resolve")
    if held.gid is None and handler is None:
        fail("--handler is required for a helper participant: its handler's commit or abort runs")
    address = coordinator or (held.coordinator.split() or [""])[0]
    if not address:
        said = "no coordinator recorded"
    else:
        try:
            said = ask_outcome(txn_id, address, _credentials(tls_ca, tls_cert, tls_key), timeout_s)
        except grpc.aio.AioRpcError as e:
            # Fail closed: only "no connection at all" may mean the coordinator is gone. A
            # refusal, a TLS mistake, a timeout or any other answer leaves it possibly up
            # and holding COMMITTED, and a guess here would break atomicity.
            if not rpc.unreachable(e):
                refused = e.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)
                what = "refused this client" if refused else "gave no outcome"
                fail(f"coordinator {address} {what} ({rpc.describe(e)}); nothing decided (fix the call, or --force)")
            said = f"unreachable ({rpc.describe(e)})"
    if said in ("COMMITTED", "PENDING") and not force:
        fail(f"coordinator {address} says {said}: it will settle {txn_id} itself; use --force to override")
    verb = "commit" if decision == COMMITTED else "abort"
    click.echo(f"{txn_id}: PREPARED at {store}; coordinator {address or '-'}: {said}")
    if not yes and not click.confirm(f"Heuristically {verb} {txn_id} here? This cannot be undone", default=False):
        fail("not confirmed; nothing changed")
    if held.gid is None:
        assert handler is not None
        apply_heuristic(store, load_handler(handler), txn_id, decision, said, forced=force)
    else:  # a PostgreSQL prepared transaction: the adapter's own COMMIT/ROLLBACK PREPARED
        apply_prepared_heuristic(store, txn_id, decision, said, forced=force)
    _log.warning("heuristic_decision", txn_id=txn_id, decision=decision, store=store, coordinator=said, forced=force)
    click.echo(f"{txn_id}: heuristically {decision} at {store} (recorded in twopc_heuristic)")


def main(argv: Sequence[str] | None = None) -> None:
    """The `twopc` console script."""
    configure_logs("console", level="warning", stream=sys.stderr)
    cli.main(args=argv, prog_name="twopc")


if __name__ == "__main__":
    main()

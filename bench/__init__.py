"""twopc's benchmark: what two-phase commit costs over the bare message pattern.

Run it with `python -m bench` (see `--help`). Every phase drives a closed loop of
`--concurrency` callers for `--duration-s` against real processes on loopback:

* the floor: parallel Prepare to every server, then parallel Commit, with twopc's own
  generated stubs against trivial servers (`bench.floor`) that store nothing;
* twopc through `twopc.Coordinator` with the wallet and order services (`bench.shop`);
* twopc with N durable participants (`bench.durable`), each against a floor of N.

Durable processes run under `bench.probe`, which reports their stores' fsync counters
on request without touching their code. Results go to a table and a JSON file.
"""

"""Development tooling, outside the runtime path of the coordinator and participant:
a private PostgreSQL server for tests and benchmarks (`pgserver`), and helpers that
start real service processes, proxies and faults (`testing`). Nothing in the protocol
imports this package. Named crash points, which a running service reads, are
`twopc.faults`.
"""

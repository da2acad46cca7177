"""Security: who may call what (`auth`), the bound on every input (`limits`), and a
throwaway certificate authority for tests and the demo (`pki`, the `tls` extra).
Whom a participant believes about outcomes is the participant's own rule
(`twopc.participant.trust`).
"""

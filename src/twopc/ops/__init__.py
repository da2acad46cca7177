"""Operating twopc: Prometheus metrics (`metrics`) and the `twopc` command (`cli`).

They sit above the protocol: they use the coordinator and the participant, and nothing
in the protocol imports them. Both need the `ops` extra.
"""

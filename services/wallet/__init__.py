"""The wallet service: accounts in integer minor units, and the Debit operation.

A debit is a reservation first: prepare records a hold against the account, so the
money is no longer available but still in the balance; commit turns the hold into a
ledger debit; abort releases it.
"""

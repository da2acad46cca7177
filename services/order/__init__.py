"""The order service: products with stock, orders, and the PlaceOrder operation.

An order is a reservation first: prepare reserves every item (all or nothing) and
records the order as PENDING; commit ships the stock and confirms the order; abort
releases the reservations and cancels it.
"""

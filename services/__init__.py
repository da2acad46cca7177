"""The demo's services: wallet and order (participants) and shop (the coordinator)."""

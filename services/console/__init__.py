"""The web console: make purchases and watch two-phase commit happen (`make console`)."""

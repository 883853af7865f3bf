"""Who is calling and what it costs: API keys with scopes, rate limits, budgets with reservations, and
the one spend recorder that owns the ledger."""

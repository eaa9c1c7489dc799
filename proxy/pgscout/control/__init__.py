"""pgscout's own connection to the server: limits, catalog and connection budgets."""

"""Tools that read runs: tables, plots, the published numbers, the privacy audit, the co-occurrence bound."""

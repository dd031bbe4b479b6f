"""Human feedback: answer pairs for people to judge, their judgements, and export as preference data.

Modules: `store` (the SQLite database), `routes` (the HTTP endpoints and the rating page), `cli`
(`adapterdock feedback export|stats`). Boundary: this package imports nothing from here on purpose, so
`adapterdock feedback` and the middleware load only the module they need (no FastAPI for the CLI).
"""

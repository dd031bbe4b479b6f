"""Human feedback: answer pairs for people to judge, their judgements, and export as preference data.

Modules, one concern each: `records` (pairs, judgements, the per-rater left/right view), `store` (the
SQLite database), `auth` (who may use the rating paths; the API-key middleware imports it), `routes`
(the HTTP endpoints and the rating page), `aggregate` (verdicts, agreement, export rows, win rates) and
`cli` (`adapterdock feedback export|stats`). Boundary: this file imports nothing, so the CLI and the
middleware load only the modules they need (no FastAPI for the CLI, no routes for the middleware).
"""

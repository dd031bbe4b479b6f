"""Routers of the hub service, one per concern: repos, commits, LFS, file downloads, browsing."""

"""The self-hosted hub: a FastAPI app speaking the part of the Hugging Face Hub HTTP API that
`huggingface_hub` uses (repos, commits with regular and LFS files, refs and tags, trees, downloads), plus
adapter browsing (`GET /api/adapters`, `GET /`).

Boundary: the service stores repos and files; it knows adapters only by reading their `manifest.json`.
Run it with `python -m hub.service --root DIR` or `adapterdock hub serve`. See docs/hub.md.
"""

from hub.service.app import create_app

__all__ = ["create_app"]

"""Run the self-hosted hub: `python -m hub.service --root DIR [--host H] [--port P] [--token-file F]`.

Same as `adapterdock hub serve`. See docs/hub.md for the API and token file format.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from hub.service.app import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hub.service", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder for blobs and the index")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--token-file", type=Path, default=None, help="tokens and rights (see docs/hub.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.root, host=args.host, port=args.port, token_file=args.token_file)


if __name__ == "__main__":
    main()

"""adapterdock: train task adapters, keep them in a versioned registry, serve many on one base.

This package holds only the `adapterdock` command, which hands each group to the package that owns it:
`base` and `hub` to `hub`, `train` to `trainers`, `serve` and `feedback` to `server`, `quickstart` to itself.
"""

__version__ = "0.1.0"

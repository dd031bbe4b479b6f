"""adapterdock's registry: adapter references, manifests, the local store, base models and remote hubs.

Boundary: the hub knows files, names and checksums. It imports neither `trainers` nor `server`, and no torch;
the contract with both is data (an adapter folder plus `manifest.json`).
"""

"""Machine-checked arguments about the real lifecycle core (see proofs/README.md)."""

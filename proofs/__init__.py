"""Machine-checked arguments about the report lifecycle (see proofs/README.md)."""

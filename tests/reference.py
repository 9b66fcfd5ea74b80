"""The per-client reference lives in `src/reference.py` (the bench uses it too); re-exported for the tests."""
from src.reference import ReferenceClient, client_batches, make_client, train_client

__all__ = ["ReferenceClient", "client_batches", "make_client", "train_client"]

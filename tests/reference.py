"""The per-client reference lives in `src/reference.py` (the bench uses it too); re-exported for the tests."""

from src.reference import ExactAlignment, ReferenceClient, client_batches, make_client, train_client

__all__ = ["ExactAlignment", "ReferenceClient", "client_batches", "make_client", "train_client"]

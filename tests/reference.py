"""The per-client reference lives in `src/clients/reference.py` (the bench uses it too); re-exported for the tests."""

from src.clients.reference import ExactAlignment, ReferenceClient, client_batches, make_client, train_client

__all__ = ["ExactAlignment", "ReferenceClient", "client_batches", "make_client", "train_client"]

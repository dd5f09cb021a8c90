"""The WaveSpeed API client layer: request and response models, the sans-I/O protocol and
operations, the sync and async clients, retry and poll policies, image checks and webhooks.

Imports neither Prefect nor boto3 (tests/test_layers.py holds it to that), so it can be used
on its own, in any orchestrator or none.
"""

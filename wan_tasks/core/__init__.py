"""The never-pay-twice core: request identity, the submission ledger, reconciliation through
the service's history, the submit-once algorithm, budgets, redaction, inference-time learning
and batch manifests.

Imports no Prefect: the Prefect tasks call into it, and another orchestrator could too.
"""

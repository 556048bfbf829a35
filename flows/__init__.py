"""Prefect flows that schedule the DVC stages (ARCHITECTURE.md, docs/ORCHESTRATION.md).

``flows.dag`` reads the stage graph from DVC; ``flows.chain`` runs it (``chain``
flow, and the one-stage ``stage`` flow the work pools run); ``flows.sweep`` fans
out ``dvc exp run`` variants in clones; ``flows.resources`` says which stages
need a GPU. Stages run only through ``dvc repro``, never by import.
"""

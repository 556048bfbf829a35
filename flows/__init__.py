"""Prefect flows that schedule the DVC stages (docs/ARCHITECTURE.md, docs/ORCHESTRATION.md).

``flows.dag`` reads the stage graph from DVC; ``flows.chain`` runs it (the
``chain`` flow, and the one-stage ``stage`` flow the work pools run);
``flows.sweep`` fans out ``dvc exp run`` variants in clones; ``flows.resources``
says which stages need a GPU and where each stage runs; ``flows.stage_run`` is
one stage's pull → repro → push → metrics artifacts; ``flows.machines`` is the
many-machine protocol (the run state a coordinator sends, the worker's checkout,
pull, repro, push and lock entry, the coordinator's lock merge); ``flows.deploy``
creates pools, queues (one per GPU, concurrency limit 1) and deployments;
``flows.dvc_cli`` runs the
commands; ``flows.local_server`` starts a loopback server and workers;
``flows.demo`` writes a tiny DVC project to try it all on. Stages run only
through ``dvc repro``, never by import.
"""

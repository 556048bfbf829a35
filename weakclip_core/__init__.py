"""weakclip_core: the library behind weakclip-pipeline (models, losses, CRF, data, CAM store, metrics, config).

It knows nothing about DVC or Prefect; the stages in ``pipeline/`` call it.
"""

__version__ = "0.1.0"

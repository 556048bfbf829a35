"""``python -m pipeline.report`` (what ``make report`` runs): write ``reports/index.html``."""

from pipeline.report import main

if __name__ == "__main__":
    raise SystemExit(main())

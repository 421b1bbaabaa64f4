"""evaluate.py's report: the sweep of sample sets of a checkpoint (EMA widths, guidance scales, seeds), their
scores, the NLL bound and its figures, written to metrics.json. The metrics themselves live in src.metrics and
the sampling in src.sampling."""

from .run import run

__all__ = ["run"]

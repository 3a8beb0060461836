"""Tables and figures from finished runs: `python -m fair_calib.report <sweep folder>`."""

from fair_calib.report.build import Report, build_report
from fair_calib.report.collect import RunRecord, collect_runs
from fair_calib.report.tables import Table

__all__ = ["Report", "RunRecord", "Table", "build_report", "collect_runs"]

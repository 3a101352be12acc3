"""Reports: tables, figures and self-contained HTML pages built from evaluated results."""

from diffmem.report.detection_report import EvaluatedSetting, write_detection_report

__all__ = ["EvaluatedSetting", "write_detection_report"]

"""The error hierarchy, re-exported for the pipelines (it lives in ``serving.errors``)."""

from serving.errors import HotpathError, check_order, first_line

__all__ = ["HotpathError", "check_order", "first_line"]

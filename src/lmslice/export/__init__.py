"""Exporters: a sliced or pruned model written in formats that other tools load without lmslice."""

from lmslice.export.standard import (
    TIE_BY_DEFAULT,
    check_family,
    check_standard_source,
    fit_tied_scale,
    standard_config,
    standard_model,
)

__all__ = ["TIE_BY_DEFAULT", "check_family", "check_standard_source", "fit_tied_scale", "standard_config",
           "standard_model"]

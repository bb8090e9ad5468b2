"""Exporters: a sliced or pruned model written in formats that other tools load without lmslice."""

from lmslice.export.standard import (
    STANDARD,
    TIE_BY_DEFAULT,
    check_family,
    fit_tied_scale,
    is_standard,
    standard_config,
    standard_model,
)

__all__ = ["STANDARD", "TIE_BY_DEFAULT", "check_family", "fit_tied_scale", "is_standard", "standard_config",
           "standard_model"]

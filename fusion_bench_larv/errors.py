"""Every error and warning class a user of the plugin can meet, in one place.

Construction-time problems with a method's own keys are :class:`LarvConfigError`; problems with
the *models* (what only a run can see) are :class:`LarvInputError`. Plain classes, no imports.
"""

from __future__ import annotations

__all__ = [
    "CompareError",
    "LarvAttributeError",
    "LarvConfigError",
    "LarvInputError",
    "LarvLayerError",
    "LarvWarning",
    "LayerGroupingError",
]


class LarvConfigError(ValueError):
    """A config key (LARV's, LiNeS's, a base merger's, a validation grid's) has a value that is
    not allowed."""


class LarvAttributeError(LarvConfigError, AttributeError):
    """A write to a LARV attribute that is not allowed: an unknown (usually misspelt) attribute of
    ``LARVAlgorithm``, or any field of the read-only ``LarvSettings``. Both a
    :class:`LarvConfigError` and the ``AttributeError`` Python raises for such writes."""


class LayerGroupingError(ValueError):
    """No transformer block could be found (or a user pattern is malformed)."""


class LarvInputError(ValueError):
    """The models LARV was given cannot be merged as they are (found at run time, before anything
    is written): no ``_pretrained_``, NaN/Inf weights, θ_0 and the merged model disagree in keys or
    shapes, or no usable layer structure."""


class LarvLayerError(LarvInputError, LayerGroupingError):
    """No (or too few) transformer blocks found in the model; set ``layer_pattern``."""


class LarvWarning(UserWarning):
    """Something odd but not wrong (e.g. an all-zero merged update)."""


class CompareError(ValueError):
    """Two runs cannot be compared sample by sample; the message says why and what to do."""

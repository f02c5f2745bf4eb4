"""Core of sd-webui-instantid: identity-preserving and image-prompted generation.

This package knows nothing of the webui; the webui glue lives in ``scripts/``.
"""

__version__ = "0.1.0"

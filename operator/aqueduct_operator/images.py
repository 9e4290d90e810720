"""Which image serves a Pipeline that does not name one (``spec.image`` unset).

Handler-only Pipelines run the operator's own image (the base image). A Pipeline with ``runtime``
steps runs the image of its runtime: ``aqueduct-onnx``, ``aqueduct-torch``, or ``aqueduct-sklearn``,
which also holds xgboost and lightgbm. The chart passes each runtime's image to the operator
(``AQUEDUCT_RUNTIME_IMAGE_<RUNTIME>``); an unset one is derived from the operator's image as
``<repository>-<family>:<tag>``, the naming the chart uses by default. Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

# The built-in model runtimes a step may name (the serving pod's config.schema.json; tests/contract checks).
RUNTIMES = ("onnx", "torch", "sklearn", "xgboost", "lightgbm")
# The image (suffix) that holds each runtime's packages.
FAMILY = {"onnx": "onnx", "torch": "torch", "sklearn": "sklearn", "xgboost": "sklearn", "lightgbm": "sklearn"}
# The operator's own image (the chart sets it): Pipelines without spec.image and without runtime steps run it.
IMAGE_ENV = "AQUEDUCT_OPERATOR_IMAGE"
RUNTIME_IMAGE_ENV_PREFIX = "AQUEDUCT_RUNTIME_IMAGE_"


def runtime_image_env(runtime: str) -> str:
    """The operator's environment variable holding ``runtime``'s image, e.g. ``AQUEDUCT_RUNTIME_IMAGE_ONNX``."""
    return RUNTIME_IMAGE_ENV_PREFIX + runtime.upper()


def derived(image: str, runtime: str) -> str | None:
    """``registry/aqueduct:0.2`` -> ``registry/aqueduct-onnx:0.2``; None for an image pinned by digest."""
    if "@" in image:
        return None
    slash = image.rfind("/")
    colon = image.rfind(":")
    repository, tag = (image[:colon], image[colon:]) if colon > slash else (image, "")
    return f"{repository}-{FAMILY[runtime]}{tag}"


def runtime_image(runtime: str, default_image: str | None, configured: Mapping[str, str]) -> str | None:
    """The image serving ``runtime``: the configured one (xgboost, lightgbm: else the sklearn one), else derived
    from the operator's; None if neither."""
    own = configured.get(runtime) or configured.get(FAMILY[runtime])
    if own:
        return own
    return derived(default_image, runtime) if default_image else None


def from_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """The runtime images the operator was given (``AQUEDUCT_RUNTIME_IMAGE_*``), by runtime name."""
    found = {runtime: environ.get(runtime_image_env(runtime), "") for runtime in RUNTIMES}
    return {runtime: image for runtime, image in found.items() if image}

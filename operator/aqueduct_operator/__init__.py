"""aqueduct-operator: reconciles ``Pipeline`` custom resources into serving pods.

Never imports the engine (``aqueduct``) or the serving pod (``aqueduct_service``): the only contract
with them is the serving config file format (``config.schema.json``) and the pod's HTTP endpoints.
"""

GROUP = "aqueduct.dev"
VERSION = "v1alpha1"
KIND = "Pipeline"
PLURAL = "pipelines"
API_VERSION = f"{GROUP}/{VERSION}"

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION"]

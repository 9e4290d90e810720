"""The aqueduct serving pod: one flow served over HTTP with the Open Inference Protocol v2."""

from .app import create_app
from .errors import InferenceError
from .health import ServingState
from .pipeline import build_flow
from .settings import ConfigError, ServerSettings, Settings, StepSettings, TensorSpec, load_settings
from .task import InferenceTask

__all__ = [
    "ConfigError",
    "InferenceError",
    "InferenceTask",
    "ServerSettings",
    "ServingState",
    "Settings",
    "StepSettings",
    "TensorSpec",
    "build_flow",
    "create_app",
    "load_settings",
]

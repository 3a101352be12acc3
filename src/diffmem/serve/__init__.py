"""The interactive explanation page: a local web server where a prompt is scored and explained as it is edited."""

from diffmem.serve.explainer import PromptExplainer, QueueFull
from diffmem.serve.server import ExplanationServer

__all__ = ["ExplanationServer", "PromptExplainer", "QueueFull"]

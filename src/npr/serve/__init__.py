"""OpenAI-compatible HTTP serving with native parallel decoding: `create_app(engine)`, run by `npr serve`."""

from npr.serve.app import create_app
from npr.serve.scheduler import Scheduler

__all__ = ["Scheduler", "create_app"]

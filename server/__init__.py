"""The gradpool coordinator: worker registry, graph cache, sharding and ordered reduction.

Start it with `gradpool coordinator` or `python -m gradpool.server`.
"""

from .config import CoordinatorConfig, parse_args
from .coordinator import CoordinatorServicer, RunningCoordinator, main, serve, start

__all__ = ["CoordinatorConfig", "CoordinatorServicer", "RunningCoordinator", "main", "parse_args", "serve", "start"]

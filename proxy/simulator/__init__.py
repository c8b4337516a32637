"""A Bifrost video API simulator: the Quickstart's upstream and the tests' fixture."""

from .app import SimulatorConfig, create_simulator

__all__ = ["SimulatorConfig", "create_simulator"]

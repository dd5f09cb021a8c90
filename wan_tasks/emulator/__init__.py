"""Local emulator of the WaveSpeed API: a real HTTP server for tests, offline work and dry runs."""

from wan_tasks.emulator.config import EmulatorConfig, FaultPlan, FaultRates
from wan_tasks.emulator.server import Emulator, run_emulator

__all__ = ["Emulator", "EmulatorConfig", "FaultPlan", "FaultRates", "run_emulator"]

"""diffusers-style schedulers (`SchedulerMixin, ConfigMixin`) of the latentheat samplers."""

from .scheduling_dtm import DTMScheduler, DTMSchedulerOutput
from .scheduling_thermalizer import ThermalizerScheduler, ThermalizerSchedulerOutput

__all__ = ["DTMScheduler", "DTMSchedulerOutput", "ThermalizerScheduler", "ThermalizerSchedulerOutput"]

"""diffusers-style schedulers (`SchedulerMixin, ConfigMixin`) of the latentheat samplers."""

from .scheduling_dtm import DTMScheduler, DTMSchedulerOutput

__all__ = ["DTMScheduler", "DTMSchedulerOutput"]

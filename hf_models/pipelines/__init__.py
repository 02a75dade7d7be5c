from .pipeline_code_image import CodeImagePipeline
from .pipeline_dtm import DTMPipeline
from .pipeline_thermalized_rollout import (ThermalizeCodesOutput, ThermalizedRolloutOutput,
                                            ThermalizedRolloutPipeline)
from .pipeline_tokcom import TokComPipeline, TokComPipelineOutput

__all__ = [
    "CodeImagePipeline",
    "DTMPipeline",
    "ThermalizeCodesOutput",
    "ThermalizedRolloutOutput",
    "ThermalizedRolloutPipeline",
    "TokComPipeline",
    "TokComPipelineOutput",
]

from .pipeline_code_image import CodeImagePipeline
from .pipeline_dtm import DTMPipeline

__all__ = ["CodeImagePipeline", "DTMPipeline"]

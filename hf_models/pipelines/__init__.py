from .pipeline_code_image import CodeImagePipeline

__all__ = ["CodeImagePipeline"]

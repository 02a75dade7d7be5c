"""Block-sparse denoising thermodynamic model (DTM): sparse Ising energies per reverse step of a bit-flip diffusion."""

from transformers import AutoConfig, AutoModel

from .configuration_dtm import DTMConfig
from .gibbs import DTMStepParameters, IsingGraph, bitflip_schedule, build_lattice_graph, gibbs_sweeps
from .modeling_dtm import DTMModel, DTMOutput, DTMPreTrainedModel

AutoConfig.register("dtm", DTMConfig, exist_ok=True)
AutoModel.register(DTMConfig, DTMModel, exist_ok=True)

__all__ = [
    "DTMConfig",
    "DTMModel",
    "DTMOutput",
    "DTMPreTrainedModel",
    "DTMStepParameters",
    "IsingGraph",
    "bitflip_schedule",
    "build_lattice_graph",
    "gibbs_sweeps",
]

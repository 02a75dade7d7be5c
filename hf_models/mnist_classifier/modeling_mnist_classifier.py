"""MNIST judge classifier: a small CNN whose penultimate layer gives the features for classifier FID.

Input convention: `pixel_values` float in [-1, 1] of shape (batch, 1, 28, 28) (0 = -1 = background).
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mnist_classifier import MNISTClassifierConfig


@dataclass
class MNISTClassifierOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): cross-entropy, when `labels` is given.
        logits (`torch.FloatTensor` of shape `(batch, num_labels)`): class scores.
        features (`torch.FloatTensor` of shape `(batch, hidden_size)`): penultimate activations (after ReLU),
            the features used for classifier FID.
    """

    loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    features: Optional[torch.FloatTensor] = None


class MNISTClassifierPreTrainedModel(PreTrainedModel):
    config_class = MNISTClassifierConfig
    base_model_prefix = "classifier"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = []

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
            module.num_batches_tracked.zero_()


class MNISTClassifierModel(MNISTClassifierPreTrainedModel):
    def __init__(self, config: MNISTClassifierConfig):
        super().__init__(config)
        blocks, in_ch = [], config.num_channels
        for out_ch in config.conv_channels:
            blocks += [
                nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(),
                nn.MaxPool2d(2),  # 28 -> 14 -> 7 -> 3
                nn.Dropout(config.dropout),
            ]
            in_ch = out_ch
        self.convs = nn.Sequential(*blocks)
        side = config.image_size >> len(config.conv_channels)
        self.fc = nn.Linear(in_ch * side * side, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.num_labels)
        self.classifier_dropout = nn.Dropout(config.classifier_dropout)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.LongTensor] = None, return_dict=None, **kwargs):
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, image_size, image_size)`): pixels in [-1, 1].
        labels (`torch.LongTensor` of shape `(batch,)`, *optional*): class ids for the cross-entropy loss.
        """
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        h = self.convs(pixel_values).flatten(1)  # (B, C * side * side)
        features = torch.relu(self.fc(self.classifier_dropout(h)))  # (B, hidden_size)
        logits = self.head(self.classifier_dropout(features))  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output = MNISTClassifierOutput(loss=loss, logits=logits, features=features)
        return output if return_dict else output.to_tuple()


__all__ = ["MNISTClassifierModel", "MNISTClassifierOutput", "MNISTClassifierPreTrainedModel"]

"""Configuration of the MNIST judge classifier (a small CNN used for classifier-feature FID)."""

from transformers import PretrainedConfig


class MNISTClassifierConfig(PretrainedConfig):
    r"""
    Args:
        num_channels (`int`, *optional*, defaults to 1): input channels.
        image_size (`int`, *optional*, defaults to 28): input height and width; must be >= 8.
        conv_channels (`list[int]`, *optional*, defaults to `[32, 64, 128]`): output channels of the
            conv blocks (each conv 3x3 -> BatchNorm -> ReLU -> 2x2 max-pool).
        hidden_size (`int`, *optional*, defaults to 128): width of the penultimate layer (the FID features).
        dropout (`float`, *optional*, defaults to 0.05): dropout after each conv block.
        classifier_dropout (`float`, *optional*, defaults to 0.25): dropout before the two linear layers.
        num_labels (`int`, *optional*, defaults to 10): number of classes; labels are "0".."9" by default.
    """

    model_type = "mnist_classifier"

    def __init__(
        self,
        num_channels=1,
        image_size=28,
        conv_channels=(32, 64, 128),
        hidden_size=128,
        dropout=0.05,
        classifier_dropout=0.25,
        num_labels=10,
        **kwargs,
    ):
        if image_size >> len(conv_channels) < 1:
            raise ValueError(
                f"image_size={image_size} is too small for {len(conv_channels)} pooling stages (conv_channels={list(conv_channels)})"
            )
        self.num_channels = num_channels
        self.image_size = image_size
        self.conv_channels = list(conv_channels)
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.classifier_dropout = classifier_dropout
        if kwargs.get("id2label") is None:
            kwargs["id2label"] = {i: str(i) for i in range(num_labels)}
            kwargs["label2id"] = {str(i): i for i in range(num_labels)}
        super().__init__(**kwargs)


__all__ = ["MNISTClassifierConfig"]

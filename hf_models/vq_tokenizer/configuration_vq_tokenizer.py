"""Configuration of the VQ image tokenizer (conv encoder, EMA vector quantizer, conv decoder)."""

from transformers import PretrainedConfig


class VQTokenizerConfig(PretrainedConfig):
    r"""
    Configuration for [`VQTokenizerModel`]: images `(B, C, H, W)` in [-1, 1] -> a grid of codes `(B, h, w)` with
    `h = H // 2**len(hidden_channels)` -> images.

    Args:
        image_size (`int`, *optional*, defaults to 28):
            Side of the (square) training images. Must be divisible by `2**len(hidden_channels)`.
        num_channels (`int`, *optional*, defaults to 1):
            Channels of the images.
        hidden_channels (`tuple[int]`, *optional*, defaults to `(64, 128)`):
            Channels of each encoder stage; every stage halves the resolution (28 -> 14 -> 7 with two stages). The
            decoder mirrors them.
        num_res_blocks (`int`, *optional*, defaults to 2):
            Residual blocks per stage, in the encoder and the decoder.
        codebook_size (`int`, *optional*, defaults to 256):
            Number of codes `K`.
        embedding_dim (`int`, *optional*, defaults to 32):
            Dimension `D` of each codebook vector.
        commitment_cost (`float`, *optional*, defaults to 0.25):
            Weight `beta` of the commitment loss `beta * mse(z, sg(q))`.
        ema_decay (`float`, *optional*, defaults to 0.95):
            Decay of the EMA codebook statistics. 0.95 with aggressive restarts used all 256 codes on MNIST; 0.99
            with usage-proportional restarts used only 32.
        ema_epsilon (`float`, *optional*, defaults to 1e-5):
            Laplace smoothing of the EMA cluster sizes.
        dead_code_threshold (`float`, *optional*, defaults to 1.0):
            A code whose EMA usage count (codes per training step) falls below this value is restarted from a random
            encoder output of the current batch. 0 disables restarts.
        ema_sync_distributed (`bool`, *optional*, defaults to `True`):
            When `torch.distributed` is initialised, all-reduce the codebook statistics across processes and take
            the restart vectors from rank 0, so every rank keeps the same codebook. Every rank must then run the
            training-mode forward passes together (as DDP/FSDP/DeepSpeed training does).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initial codebook vectors.
    """

    model_type = "vq_tokenizer"

    def __init__(
        self,
        image_size=28,
        num_channels=1,
        hidden_channels=(64, 128),
        num_res_blocks=2,
        codebook_size=256,
        embedding_dim=32,
        commitment_cost=0.25,
        ema_decay=0.95,
        ema_epsilon=1e-5,
        dead_code_threshold=1.0,
        ema_sync_distributed=True,
        initializer_range=0.02,
        **kwargs,
    ):
        kwargs.pop("hidden_size", None)  # derived (a property); dropped if a serialised dict carries it
        hidden_channels = list(hidden_channels) if isinstance(hidden_channels, (list, tuple)) else hidden_channels
        if not isinstance(hidden_channels, list) or not hidden_channels or not all(
            isinstance(c, int) and c > 0 for c in hidden_channels
        ):
            raise ValueError(
                f"hidden_channels={hidden_channels!r} is invalid: expected a non-empty list of positive ints"
            )
        for name, value in (
            ("image_size", image_size),
            ("num_channels", num_channels),
            ("embedding_dim", embedding_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
        factor = 2 ** len(hidden_channels)
        if image_size % factor:
            raise ValueError(
                f"image_size={image_size} is not divisible by 2**len(hidden_channels)={factor} "
                f"(hidden_channels={hidden_channels}); each stage halves the resolution"
            )
        if not isinstance(num_res_blocks, int) or num_res_blocks < 0:
            raise ValueError(f"num_res_blocks={num_res_blocks!r} is invalid: expected an int >= 0")
        if not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"codebook_size={codebook_size!r} is invalid: expected an int >= 2")
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay!r} is invalid: expected 0 < ema_decay < 1")
        if not ema_epsilon > 0.0:
            raise ValueError(f"ema_epsilon={ema_epsilon!r} is invalid: expected ema_epsilon > 0")
        if not commitment_cost >= 0.0:
            raise ValueError(f"commitment_cost={commitment_cost!r} is invalid: expected commitment_cost >= 0")
        if not dead_code_threshold >= 0.0:
            raise ValueError(
                f"dead_code_threshold={dead_code_threshold!r} is invalid: expected >= 0 (0 disables restarts)"
            )
        if not initializer_range > 0.0:
            raise ValueError(f"initializer_range={initializer_range!r} is invalid: expected > 0")

        self.image_size = image_size
        self.num_channels = num_channels
        self.hidden_channels = hidden_channels
        self.num_res_blocks = num_res_blocks
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.commitment_cost = float(commitment_cost)
        self.ema_decay = float(ema_decay)
        self.ema_epsilon = float(ema_epsilon)
        self.dead_code_threshold = float(dead_code_threshold)
        self.ema_sync_distributed = bool(ema_sync_distributed)
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)

    def to_dict(self):
        output = super().to_dict()
        # transformers' `custom_object_save` treats any class whose name contains "Tokenizer" as a text tokenizer
        # and writes its auto_map entry as a (slow, fast) pair; these are models, so store the plain class path.
        auto_map = output.get("auto_map")
        if auto_map:
            output["auto_map"] = {
                key: next(v for v in value if v) if isinstance(value, (list, tuple)) and key != "AutoTokenizer" else value
                for key, value in auto_map.items()
            }
        return output

    @property
    def hidden_size(self) -> int:
        """Widest feature width (the last encoder stage); read by DeepSpeed's "auto" bucket sizes."""
        return self.hidden_channels[-1]

    @property
    def num_stages(self) -> int:
        return len(self.hidden_channels)

    @property
    def latent_size(self) -> int:
        """Side of the code grid: `image_size // 2**len(hidden_channels)` (7 for the seed config)."""
        return self.image_size // 2 ** len(self.hidden_channels)

    @property
    def num_codes(self) -> int:
        """Codes per image, `latent_size**2` (49 for the seed config)."""
        return self.latent_size**2


__all__ = ["VQTokenizerConfig"]

"""Configuration of the block-sparse denoising thermodynamic model (DTM)."""

from transformers import PretrainedConfig


TIME_GRIDS = ("linear", "log")
DSM_LOSSES = ("pseudo_likelihood", "ratio_matching")
TIMESTEP_SAMPLING = ("per_sample", "per_batch")


class DTMConfig(PretrainedConfig):
    r"""
    Configuration for [`DTMModel`]: `T` Ising energy models, one per reverse step of a bit-flip diffusion over
    binarized images `(B, C, H, W)`. Step `t` models `p(x^{(t-1)} | x^{(t)})` on a sparse lattice graph (see
    `hf_models.dtm.gibbs` for the spin, site and energy conventions).

    Args:
        image_size (`int`, *optional*, defaults to 64):
            Side `H = W` of the (square) images. Must be divisible by `block_size`.
        num_channels (`int`, *optional*, defaults to 3):
            Channels `C`; one spin per channel and pixel.
        binarize_threshold (`float`, *optional*, defaults to 0.5):
            Pixels in [0, 1] above it become spin +1, the rest -1 (inputs already in {-1, +1} pass unchanged).
        num_train_timesteps (`int`, *optional*, defaults to 100):
            Number of diffusion steps `T` = number of energy models.
        bitflip_rate (`float`, *optional*, defaults to 6.0):
            Rate `lambda` of the forward process: a step of length `dtau` on the time grid (total time 1) flips each
            bit with probability `1/2 (1 - exp(-lambda dtau))`; after the last step a bit has flipped with
            probability `1/2 (1 - exp(-lambda))` (0.4988 at 6.0, close to uniform bits).
        time_grid (`str`, *optional*, defaults to `"linear"`):
            `"linear"` (`tau_k = k / T`) or `"log"` (geometric from `log_grid_min_time` to 1).
        log_grid_min_time (`float`, *optional*, defaults to 1e-3):
            First grid time of the `"log"` grid, in (0, 1).
        block_size (`int`, *optional*, defaults to 8):
            Side of the square pixel blocks; window couplings never cross a block boundary (a block-diagonal coupling
            matrix), and latent spins belong to one block each.
        window (`int`, *optional*, defaults to 2):
            Radius of the local couplings (Chebyshev): every channel pair of pixels at most `window` apart (inside a
            block) is coupled. 1 = 8-neighbour lattice, 2 = 5x5 window; 0 = no local couplings. Must be
            `< block_size`.
        skip_connections (`int` or `list[list[int]]`, *optional*, defaults to 4):
            Long-range couplings: a list of pixel offsets `[dy, dx]` (Chebyshev length `> window`, inside the image),
            or a count `n` taking the first `n` of `(0, d), (d, 0), (d, d), (d, -d)` for `d = block_size, 2 *
            block_size, ...` (the same pixel in neighbouring blocks). Every channel pair is coupled; open boundary.
        num_latent_spins (`int`, *optional*, defaults to 0):
            Latent spins per block, each coupled to all `C * block_size**2` visible spins of its block (never to
            another latent); summed out exactly in the training free energy.
        sweeps_per_step (`int`, *optional*, defaults to 6):
            Chromatic Gibbs sweeps per reverse step when sampling (the scheduler's default).
        num_fantasy_chains (`int`, *optional*, defaults to 64):
            Persistent chains of the negative phase (a saved buffer).
        pcd_k (`int`, *optional*, defaults to 5):
            Gibbs sweeps applied to the fantasy chains per training step.
        persistent_chains (`bool`, *optional*, defaults to `True`):
            `True`: PCD, chains continue from the saved buffer; `False`: CD-k, chains start from the data
            `x^{(t-1)}`.
        dsm_weight (`float`, *optional*, defaults to 1.0):
            Weight of the binary denoising score-matching term in the loss.
        dsm_loss (`str`, *optional*, defaults to `"pseudo_likelihood"`):
            `"pseudo_likelihood"` (`-log p(x_i | x_-i, x_t)` per site) or `"ratio_matching"` (Hyvarinen 2007,
            `p(flip x_i | x_-i, x_t)^2`).
        timestep_sampling (`str`, *optional*, defaults to `"per_sample"`):
            How training draws `t`: `"per_sample"` (uniform per image) or `"per_batch"` (one uniform `t` for the
            whole batch: the couplings are then shared by all chains and the PCD sweeps run one sparse matmul per
            colour, several times faster and without `(chains, edges)` temporaries at seed size).
        field_network_channels (`int`, *optional*, defaults to 0):
            Width of the conditional field network (0 = none, the original's pure Ising steps). When set, a small
            convolutional network reads the whole noisier sample `x^{(t)}` (and the step), predicts the clean bits,
            and adds the bit-flip posterior field of that prediction on every visible spin of step `t`'s Ising
            model (see `DTMModel`). The energy stays a block-sparse
            Ising model in `x^{(t-1)}` sampled by the same Gibbs sweeps (the network runs once per reverse step, not
            per sweep); it gives each step the global view of `x^{(t)}` that local couplings lack.
        field_network_dilations (`list[int]`, *optional*, defaults to `[1, 2, 4, 8, 1]`):
            One residual block (two 3x3 convolutions at half resolution) per entry, with that dilation; the
            receptive field is about `8 * sum(dilations)` pixels wide.
        field_network_x0_weight (`float`, *optional*, defaults to 1.0):
            Weight of the field network's `x_0` cross-entropy in the loss.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initial couplings (biases and the learned `x_t` terms start at 0, so an
            untrained model is the exact posterior of a pixel-independent uniform prior).
    """

    model_type = "dtm"

    def __init__(
        self,
        image_size=64,
        num_channels=3,
        binarize_threshold=0.5,
        num_train_timesteps=100,
        bitflip_rate=6.0,
        time_grid="linear",
        log_grid_min_time=1e-3,
        block_size=8,
        window=2,
        skip_connections=4,
        num_latent_spins=0,
        sweeps_per_step=6,
        num_fantasy_chains=64,
        pcd_k=5,
        persistent_chains=True,
        dsm_weight=1.0,
        dsm_loss="pseudo_likelihood",
        timestep_sampling="per_sample",
        field_network_channels=0,
        field_network_dilations=(1, 2, 4, 8, 1),
        field_network_x0_weight=1.0,
        initializer_range=0.02,
        **kwargs,
    ):
        kwargs.pop("hidden_size", None)  # derived (a property); dropped if a serialised dict carries it
        for name, value, minimum in (
            ("image_size", image_size, 1),
            ("num_channels", num_channels, 1),
            ("num_train_timesteps", num_train_timesteps, 1),
            ("block_size", block_size, 1),
            ("window", window, 0),
            ("num_latent_spins", num_latent_spins, 0),
            ("sweeps_per_step", sweeps_per_step, 1),
            ("num_fantasy_chains", num_fantasy_chains, 1),
            ("pcd_k", pcd_k, 1),
            ("field_network_channels", field_network_channels, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= {minimum}")
        if image_size % block_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by block_size={block_size}: the image is tiled by blocks"
            )
        if window >= block_size and window > 0:
            raise ValueError(
                f"window={window} is invalid with block_size={block_size}: window couplings stay inside a block, "
                f"so expected window < block_size"
            )
        if time_grid not in TIME_GRIDS:
            raise ValueError(f"time_grid={time_grid!r} is invalid: expected one of {TIME_GRIDS}")
        if dsm_loss not in DSM_LOSSES:
            raise ValueError(f"dsm_loss={dsm_loss!r} is invalid: expected one of {DSM_LOSSES}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling={timestep_sampling!r} is invalid: expected one of {TIMESTEP_SAMPLING}")
        if not (isinstance(bitflip_rate, (int, float)) and bitflip_rate > 0):
            raise ValueError(f"bitflip_rate={bitflip_rate!r} is invalid: expected a number > 0")
        if not (isinstance(log_grid_min_time, (int, float)) and 0 < log_grid_min_time < 1):
            raise ValueError(f"log_grid_min_time={log_grid_min_time!r} is invalid: expected 0 < value < 1")
        if not (isinstance(dsm_weight, (int, float)) and dsm_weight >= 0):
            raise ValueError(f"dsm_weight={dsm_weight!r} is invalid: expected a number >= 0")
        if not (isinstance(field_network_x0_weight, (int, float)) and field_network_x0_weight >= 0):
            raise ValueError(f"field_network_x0_weight={field_network_x0_weight!r} is invalid: expected a number >= 0")
        if not (isinstance(initializer_range, (int, float)) and initializer_range >= 0):
            raise ValueError(f"initializer_range={initializer_range!r} is invalid: expected a number >= 0")
        if (
            not isinstance(field_network_dilations, (list, tuple))
            or not field_network_dilations
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in field_network_dilations)
        ):
            raise ValueError(
                f"field_network_dilations={field_network_dilations!r} is invalid: expected a non-empty list of ints >= 1"
            )
        skip_connections = self._check_skips(skip_connections, window, image_size)
        if isinstance(skip_connections, int) and skip_connections:
            longest = ((skip_connections - 1) // 4 + 1) * block_size  # offsets (0, d), (d, 0), (d, d), (d, -d)
            if longest >= image_size:
                raise ValueError(
                    f"skip_connections={skip_connections} is invalid with block_size={block_size} and "
                    f"image_size={image_size}: the offsets reach d={longest} >= image_size; expected at most "
                    f"{4 * ((image_size - 1) // block_size)}"
                )

        self.image_size = image_size
        self.num_channels = num_channels
        self.binarize_threshold = float(binarize_threshold)
        self.num_train_timesteps = num_train_timesteps
        self.bitflip_rate = float(bitflip_rate)
        self.time_grid = time_grid
        self.log_grid_min_time = float(log_grid_min_time)
        self.block_size = block_size
        self.window = window
        self.skip_connections = skip_connections
        self.num_latent_spins = num_latent_spins
        self.sweeps_per_step = sweeps_per_step
        self.num_fantasy_chains = num_fantasy_chains
        self.pcd_k = pcd_k
        self.persistent_chains = bool(persistent_chains)
        self.dsm_weight = float(dsm_weight)
        self.dsm_loss = dsm_loss
        self.timestep_sampling = timestep_sampling
        self.field_network_channels = field_network_channels
        self.field_network_dilations = list(field_network_dilations)
        self.field_network_x0_weight = float(field_network_x0_weight)
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)

    @staticmethod
    def _check_skips(skip_connections, window, image_size):
        if isinstance(skip_connections, int) and not isinstance(skip_connections, bool):
            if skip_connections < 0:
                raise ValueError(f"skip_connections={skip_connections!r} is invalid: expected a count >= 0")
            return skip_connections
        if not isinstance(skip_connections, (list, tuple)):
            raise ValueError(
                f"skip_connections={skip_connections!r} is invalid: expected a count or a list of [dy, dx] offsets"
            )
        out, seen = [], set()
        for offset in skip_connections:
            if (
                not isinstance(offset, (list, tuple))
                or len(offset) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in offset)
            ):
                raise ValueError(f"skip_connections entry {offset!r} is invalid: expected [dy, dx] ints")
            dy, dx = offset
            if max(abs(dy), abs(dx)) <= window or max(abs(dy), abs(dx)) >= image_size:
                raise ValueError(
                    f"skip_connections entry {list(offset)} is invalid: expected window={window} < max(|dy|, |dx|) "
                    f"< image_size={image_size}"
                )
            key = (dy, dx) if (dy > 0 or (dy == 0 and dx > 0)) else (-dy, -dx)
            if key in seen:
                raise ValueError(f"skip_connections entry {list(offset)} is invalid: duplicate offset")
            seen.add(key)
            out.append([dy, dx])
        return out

    @property
    def image_shape(self) -> tuple:
        """`(C, H, W)` of one sample."""
        return (self.num_channels, self.image_size, self.image_size)

    @property
    def num_visible_spins(self) -> int:
        return self.num_channels * self.image_size * self.image_size

    @property
    def num_blocks(self) -> int:
        return (self.image_size // self.block_size) ** 2

    @property
    def num_latent_sites(self) -> int:
        """All latent spins of one step's model, `num_latent_spins * num_blocks`."""
        return self.num_latent_spins * self.num_blocks

    @property
    def hidden_size(self) -> int:
        """Spins of one step's model (visible + latent); read by DeepSpeed's "auto" bucket sizes."""
        return self.num_visible_spins + self.num_latent_sites


__all__ = ["DTMConfig"]

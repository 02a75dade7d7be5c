"""Block-sparse denoising thermodynamic model: one sparse Ising energy per reverse step of a bit-flip diffusion,
trained with persistent contrastive divergence plus a binary denoising score-matching term.

Step `t` (0-based, diffusers convention: level `t` is `x_0` after `t + 1` flip steps) models

    p_t(x^{(t-1)} | x^{(t)}) ∝ exp(-E_t(x^{(t-1)}, x^{(t)})),
    E_t(s, x_t) = -sum_e J_{t,e} s_i s_j - sum_i b_{t,i} s_i - sum_{i visible} (Gamma_t + g_{t,i}) x_{t,i} s_i,

with `Gamma_t = 1/2 ln((1 - p_t) / p_t)` fixed by the forward process (the exact log-likelihood of one flip step,
so an untrained model is the posterior under a uniform prior) and a learned per-site correction `g_t`. Latent spins,
if any, are summed out exactly in the free energy `F_t(x^{(t-1)} | x^{(t)})`. With `field_network_channels > 0`, a
small dilated convolutional network adds a field `n_t(x^{(t)})_i s_i` on every visible spin: still an Ising energy in
`x^{(t-1)}`, but its biases see all of `x^{(t)}`. The network predicts the clean bits, `P(x_0 = +1 | x^{(t)}) =
sigmoid(l)`, and the field is what the forward process makes of that prediction (the bit-flip posterior of
`x^{(t-1)}` given a factorised `x_0`, as in D3PM's x_0-parameterisation):

    n_t = 1/2 ln[(pi (1 - c) + (1 - pi) c) / (pi c + (1 - pi) (1 - c))],   pi = sigmoid(l),  c = cumulative flip
                                                                            probability of level t - 1 (0 at t = 0),

trained by the pseudo-likelihood and contrastive terms like every other parameter plus a cross-entropy of `l`
against `x_0` (a signal at every noise level, where the per-step likelihood of a high-noise step carries almost none).

Self-contained (torch + transformers + this folder) so `register_for_auto_class` can ship it as remote code.
"""

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dtm import DTMConfig
from .gibbs import (
    DTMStepParameters,
    IsingGraph,
    bitflip_schedule,
    build_lattice_graph,
    flip_spins,
    gibbs_sweeps,
    ising_energy,
    ising_local_fields,
    lattice_edges,
    skip_offsets,
)


@dataclass
class DTMOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        `cd_loss + dsm_weight * dsm_loss`.
    cd_loss (`torch.FloatTensor` of shape `()`):
        Contrastive-divergence surrogate per visible spin, `(mean F(data) - mean F(fantasy)) / N_v`; its gradient is
        the negative log-likelihood gradient estimate. Its value can be negative and is not a likelihood.
    dsm_loss (`torch.FloatTensor` of shape `()`):
        Binary denoising score matching per visible spin (pseudo-likelihood or ratio matching of `x^{(t-1)}` given
        its neighbours and `x^{(t)}`).
    x0_loss (`torch.FloatTensor` of shape `()`, *optional*):
        With a field network: binary cross-entropy of its `x_0` prediction per visible spin (in the loss with weight
        `field_network_x0_weight`).
    positive_free_energy (`torch.FloatTensor` of shape `(batch,)`):
        `F_t(x^{(t-1)} | x^{(t)})` of the training pairs.
    negative_free_energy (`torch.FloatTensor` of shape `(num_fantasy_chains,)`):
        Free energy of the fantasy chains after `pcd_k` sweeps, under their chains' conditions.
    timesteps (`torch.LongTensor` of shape `(batch,)`):
        Sampled steps `t`.
    noisy_sample (`torch.FloatTensor` of shape `(batch, C, H, W)`):
        `x^{(t)}` (spins).
    target_sample (`torch.FloatTensor` of shape `(batch, C, H, W)`):
        `x^{(t-1)}` (spins; `x_0` where `t = 0`).
    """

    loss: Optional[torch.FloatTensor] = None
    cd_loss: Optional[torch.FloatTensor] = None
    dsm_loss: Optional[torch.FloatTensor] = None
    x0_loss: Optional[torch.FloatTensor] = None
    positive_free_energy: Optional[torch.FloatTensor] = None
    negative_free_energy: Optional[torch.FloatTensor] = None
    timesteps: Optional[torch.LongTensor] = None
    noisy_sample: Optional[torch.FloatTensor] = None
    target_sample: Optional[torch.FloatTensor] = None


def _log_2cosh(x):
    """`log(2 cosh x)`, stable for large `|x|`."""
    return x.abs() + F.softplus(-2.0 * x.abs())


class DTMFieldBlock(nn.Module):
    """Pre-norm residual block: GroupNorm, SiLU, dilated 3x3 conv, twice."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        groups = math.gcd(channels, 8)
        self.norm1 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)
        self.norm2 = nn.GroupNorm(groups, channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return hidden_states + residual


class DTMFieldNetwork(nn.Module):
    """`x^{(t)}` `(B, C, H, W)` and the step `t` -> logits of the clean bits `P(x_0 = +1 | x^{(t)})` `(B, C, H, W)`.

    A 3x3 conv in at full resolution, a stride-2 3x3 conv down to half resolution, a learned per-step embedding
    added to every pixel, dilated residual blocks at half resolution, a nearest upsample added to the full-resolution
    features, and a zero-initialised 3x3 conv out (so an untrained model keeps the fields of the pure Ising model).
    """

    def __init__(self, config: DTMConfig):
        super().__init__()
        C, W = config.num_channels, config.field_network_channels
        self.conv_in = nn.Conv2d(C, W, 3, padding=1)
        self.conv_down = nn.Conv2d(W, W, 3, stride=2, padding=1)
        self.step_embedding = nn.Embedding(config.num_train_timesteps, W)
        self.blocks = nn.ModuleList([DTMFieldBlock(W, d) for d in config.field_network_dilations])
        self.norm_out = nn.GroupNorm(math.gcd(W, 8), W, eps=1e-6)
        self.conv_out = nn.Conv2d(W, C, 3, padding=1)
        self.conv_out._dtm_zero_init = True

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        full = self.conv_in(x_t)
        hidden_states = self.conv_down(F.silu(full))
        step = self.step_embedding(timestep.reshape(-1))  # (1, W) or (B, W)
        hidden_states = hidden_states + step[:, :, None, None]
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = F.interpolate(hidden_states, size=full.shape[-2:], mode="nearest") + full
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class DTMPreTrainedModel(PreTrainedModel):
    config_class = DTMConfig
    base_model_prefix = "dtm"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False  # no activations: every step's energy is one sparse bilinear form
    _no_split_modules = []

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Also registers the config class, so the saved `auto_map` names both and
        `AutoModel.from_pretrained(path, trust_remote_code=True)` works without latentheat installed."""
        cls.config_class.register_for_auto_class("AutoConfig")
        super().register_for_auto_class(auto_class)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, DTMModel):
            init.normal_(module.couplings, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.biases)
            init.zeros_(module.xt_couplings)
            chains = torch.randint(0, 2, module.fantasy_chains.shape, device=module.fantasy_chains.device)
            init.copy_(module.fantasy_chains, chains.to(module.fantasy_chains.dtype) * 2 - 1)
        elif isinstance(module, nn.Conv2d):
            if getattr(module, "_dtm_zero_init", False):
                init.zeros_(module.weight)
            else:
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))  # torch's default conv init
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class DTMModel(DTMPreTrainedModel):
    r"""
    `T` sparse Ising models over binarized images, one per reverse step, stored sparsely: `couplings` `(T, E)` on a
    fixed edge list (window, channel, skip and latent edges; see `hf_models.dtm.gibbs.lattice_edges`), `biases`
    `(T, N)` and the learned per-site `x_t` coupling `xt_couplings` `(T, N_v)`. `fantasy_chains` `(K, C, H, W)`
    is a saved buffer (persistent chains survive `save_pretrained` and training checkpoints).

    Example:

    ```python
    >>> from hf_models.dtm import DTMConfig, DTMModel
    >>> from hf_models.schedulers import DTMScheduler
    >>> config = DTMConfig(image_size=8, num_channels=1, block_size=4, window=1, skip_connections=2,
    ...                    num_train_timesteps=4, num_fantasy_chains=8, pcd_k=2)
    >>> model = DTMModel(config)
    >>> generator = torch.Generator().manual_seed(0)
    >>> loss = model((torch.rand(16, 1, 8, 8) > 0.5).float(), generator=generator).loss   # training
    >>> scheduler = DTMScheduler.from_model_config(config)
    >>> x = scheduler.sample_prior((2, 1, 8, 8), generator=generator)
    >>> for t in scheduler.timesteps:                                                      # sampling
    ...     x = scheduler.step(model.step_parameters(x, t), t, x, generator=generator).prev_sample
    ```
    """

    def __init__(self, config: DTMConfig):
        super().__init__(config)
        T, C, S = config.num_train_timesteps, config.num_channels, config.image_size
        self.num_visible = config.num_visible_spins
        self.num_sites = self.num_visible + config.num_latent_sites
        # the edge list is derived from the config (cheap, vectorised, always on CPU); the colouring is built lazily
        self._edges = lattice_edges(
            C, S, S, config.window, config.block_size,
            skip_offsets(config.skip_connections, config.block_size), config.num_latent_spins,
        )
        self._graph_cpu: Optional[IsingGraph] = None
        self._graph_cache: dict = {}
        self.couplings = nn.Parameter(torch.empty(T, self._edges.shape[0]))
        self.biases = nn.Parameter(torch.empty(T, self.num_sites))
        self.xt_couplings = nn.Parameter(torch.empty(T, self.num_visible))
        self.field_network = DTMFieldNetwork(config) if config.field_network_channels else None
        self.register_buffer("fantasy_chains", torch.empty(config.num_fantasy_chains, C, S, S), persistent=True)
        step_probs, cumulative_probs = bitflip_schedule(
            T, config.bitflip_rate, config.time_grid, config.log_grid_min_time
        )
        self._step_probs = step_probs  # float64 CPU, (T,)
        self._cumulative_probs = cumulative_probs
        self._xt_base = 0.5 * torch.log((1 - step_probs) / step_probs)  # Gamma_t, (T,)
        # flip probability x_0 -> x^{(t-1)} for each step t (0 at t = 0), for the field network's posterior
        self._prev_cumulative_probs = torch.cat([cumulative_probs.new_zeros(1), cumulative_probs[:-1]])
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------------
    # graph and forward-process helpers
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def num_edges(self) -> int:
        return self._edges.shape[0]

    def graph(self, device=None) -> IsingGraph:
        """The coloured graph (built on first use, then cached per device)."""
        if self._graph_cpu is None:
            c = self.config
            self._graph_cpu = build_lattice_graph(
                c.num_channels, c.image_size, c.window, c.block_size, c.skip_connections, c.num_latent_spins
            )
        device = torch.device(device if device is not None else self.couplings.device)
        if device.type == "meta":
            raise ValueError("the graph is not available on the meta device; materialise the model first")
        if device not in self._graph_cache:
            self._graph_cache[device] = self._graph_cpu if device.type == "cpu" else self._graph_cpu.to(device)
        return self._graph_cache[device]

    def xt_coupling_base(self, timestep) -> torch.Tensor:
        """`Gamma_t = 1/2 ln((1 - p_t) / p_t)`, fixed by the forward process (float32 on the model's device)."""
        t = torch.as_tensor(timestep, device="cpu")
        return self._xt_base[t].to(self.couplings.device, torch.float32)

    def binarize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (or spins) -> spins in {-1, +1}: `pixel > binarize_threshold`."""
        return torch.where(pixel_values > self.config.binarize_threshold, 1.0, -1.0).to(self.couplings.dtype)

    def _check_spins(self, name, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.config.image_shape):
            raise ValueError(f"{name} has shape {tuple(x.shape)}: expected (batch, *{tuple(self.config.image_shape)})")

    def _network_field(self, x0_logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The field on `x^{(t-1)}` implied by `P(x_0 = +1) = sigmoid(x0_logits)` through the bit-flip process."""
        c = self._prev_cumulative_probs[t.cpu()].to(device=x0_logits.device, dtype=x0_logits.dtype)
        c = c.reshape(-1, *([1] * (x0_logits.ndim - 1))) if c.ndim else c
        log_c, log_1mc = torch.log(c), torch.log1p(-c)  # log 0 = -inf is handled by logaddexp (t = 0: field = l / 2)
        log_pi, log_1mpi = F.logsigmoid(x0_logits), F.logsigmoid(-x0_logits)
        up = torch.logaddexp(log_pi + log_1mc, log_1mpi + log_c)
        down = torch.logaddexp(log_pi + log_c, log_1mpi + log_1mc)
        return 0.5 * (up - down)

    def predict_x0(self, x_t: torch.Tensor, timestep) -> torch.Tensor:
        """The field network's `P(x_0 = +1 | x^{(t)})` `(B, C, H, W)` (a model with `field_network_channels > 0`)."""
        if self.field_network is None:
            raise ValueError("predict_x0 needs a model with a field network (config.field_network_channels > 0)")
        self._check_spins("x_t", x_t)
        t = torch.as_tensor(timestep, device=self.couplings.device, dtype=torch.long)
        return torch.sigmoid(self.field_network(x_t.to(self.couplings.dtype), t))

    def _step_tensors(self, x_t: torch.Tensor, timestep, return_x0_logits: bool = False):
        """Couplings `(E,)` (int timestep) or `(B, E)` (per-sample timesteps) and external fields `(B, N)` (and the
        field network's `x_0` logits, `None` without one, when `return_x0_logits`)."""
        self._check_spins("x_t", x_t)
        B, device = x_t.shape[0], self.couplings.device
        t = torch.as_tensor(timestep, device=device, dtype=torch.long)
        if t.ndim == 1 and t.shape[0] != B:
            raise ValueError(f"timestep has shape {tuple(t.shape)}: expected a scalar or ({B},)")
        if bool(((t < 0) | (t >= self.config.num_train_timesteps)).any()):
            raise ValueError(f"timestep={timestep} is out of range [0, {self.config.num_train_timesteps})")
        couplings = self.couplings[t]  # (E,) or (B, E)
        base = self.xt_coupling_base(t.cpu()).to(device=device, dtype=self.xt_couplings.dtype)
        xt_coef = self.xt_couplings[t] + base.unsqueeze(-1)  # (N_v,) or (B, N_v)
        visible_field = xt_coef * x_t.reshape(B, -1).to(xt_coef.dtype)  # (B, N_v)
        x0_logits = None
        if self.field_network is not None:
            x0_logits = self.field_network(x_t.to(self.couplings.dtype), t)
            network_field = self._network_field(x0_logits, t)
            visible_field = visible_field + network_field.reshape(B, -1).to(visible_field.dtype)
        fields = self.biases[t].expand(B, -1)  # (B, N)
        fields = fields + F.pad(visible_field, (0, self.num_sites - self.num_visible))
        if return_x0_logits:
            return couplings, fields, x0_logits
        return couplings, fields

    def _state(self, x_prev: torch.Tensor, latents: Optional[torch.Tensor]):
        v = x_prev.reshape(x_prev.shape[0], -1).to(self.couplings.dtype)
        if latents is None:
            return F.pad(v, (0, self.num_sites - self.num_visible))  # latents at 0 contribute nothing
        if latents.shape != (v.shape[0], self.num_sites - self.num_visible):
            raise ValueError(
                f"latents has shape {tuple(latents.shape)}: expected ({v.shape[0]}, {self.num_sites - self.num_visible})"
            )
        return torch.cat([v, latents.to(v.dtype)], dim=1)

    def _free_energy(self, v_state, couplings, fields, graph):
        """`F(v) = E(v, h=0) - sum_k log 2cosh(phi_k)` (`phi_k`: field on latent `k`); `= E(v)` without latents."""
        energy = ising_energy(v_state, couplings, fields, graph)
        if self.num_sites == self.num_visible:
            return energy
        phi = ising_local_fields(v_state, couplings, fields, graph)[:, self.num_visible :]  # (B, L)
        return energy - _log_2cosh(phi).sum(-1)

    def _flip_free_energy_gap(self, v_state, couplings, fields, graph):
        """`Delta F_i = F(v with v_i flipped) - F(v)` for every visible site `(B, N_v)`; `p(v_i | rest) =
        sigmoid(Delta F_i)`."""
        local = ising_local_fields(v_state, couplings, fields, graph)  # latents at 0
        v = v_state[:, : self.num_visible]
        gap = 2.0 * v * local[:, : self.num_visible]
        if self.num_sites == self.num_visible:
            return gap
        edges = graph.edges
        latent_edge = torch.nonzero(edges.max(dim=1).values >= self.num_visible).flatten()
        vis = edges[latent_edge].min(dim=1).values  # visible end of each latent edge
        lat = edges[latent_edge].max(dim=1).values
        J = couplings[..., latent_edge]  # (E_h,) or (B, E_h)
        phi = local[:, lat]  # (B, E_h)
        change = _log_2cosh(phi - 2.0 * J * v[:, vis]) - _log_2cosh(phi)
        return gap - torch.zeros_like(gap).index_add(1, vis, change)

    # ----------------------------------------------------------------------------------------------------------------
    # public API
    # ----------------------------------------------------------------------------------------------------------------

    def energy(self, x_prev, x_t, timestep, latents=None) -> torch.Tensor:
        """`E_t(x_prev, latents | x_t)` `(B,)`; without `latents` on a model with latent spins, the free energy with
        the latents summed out exactly. `x_prev`, `x_t`: spins `(B, C, H, W)`; `timestep`: int or `(B,)`."""
        self._check_spins("x_prev", x_prev)
        couplings, fields = self._step_tensors(x_t, timestep)
        graph = self.graph(self.couplings.device)
        state = self._state(x_prev, latents)
        if latents is None:
            return self._free_energy(state, couplings, fields, graph)
        return ising_energy(state, couplings, fields, graph)

    def local_fields(self, x_prev, x_t, timestep, latents=None) -> torch.Tensor:
        """Field `f_i` on each visible spin given all other spins (`P(x_i = +1 | rest) = sigmoid(2 f_i)`),
        `(B, C, H, W)`. A model with latent spins needs `latents` `(B, num_latent_sites)`."""
        self._check_spins("x_prev", x_prev)
        if latents is None and self.num_sites > self.num_visible:
            raise ValueError("this model has latent spins: pass latents of shape (batch, num_latent_sites)")
        couplings, fields = self._step_tensors(x_t, timestep)
        state = self._state(x_prev, latents)
        local = ising_local_fields(state, couplings, fields, self.graph(self.couplings.device))
        return local[:, : self.num_visible].reshape(x_prev.shape)

    def step_parameters(self, x_t: torch.Tensor, timestep) -> DTMStepParameters:
        """The Ising parameters of reverse step `timestep` given `x_t` `(B, C, H, W)`, for `DTMScheduler.step`."""
        couplings, fields = self._step_tensors(x_t, timestep)
        t = torch.as_tensor(timestep)
        split = {}
        if t.ndim == 0:  # shared step: also give the fields as bias + coupling * x_t (the thrml backend clamps x_t)
            coupling = self.xt_couplings[int(t)] + self.xt_coupling_base(int(t))
            condition = x_t.reshape(x_t.shape[0], -1)
            bias = self.biases[int(t)]
            if self.field_network is not None:  # per-sample biases: bias + the network's field, (B, N)
                bias = fields - F.pad(coupling * condition, (0, self.num_sites - self.num_visible))
            split = dict(bias=bias.detach(), condition_coupling=coupling.detach(), condition=condition.detach())
        return DTMStepParameters(
            graph=self.graph(self.couplings.device),
            couplings=couplings.detach(),
            fields=fields.detach(),
            timestep=int(t) if t.ndim == 0 else None,
            **split,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        timesteps: Optional[torch.LongTensor] = None,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[DTMOutput, tuple]:
        r"""
        Training loss on a batch of images.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, C, H, W)`):
                Images in [0, 1] (binarized with `binarize_threshold`) or spins in {-1, +1}.
            timesteps (`torch.LongTensor` of shape `(batch,)`, *optional*):
                Steps to train; uniform in `[0, T)` when omitted.
            generator (`torch.Generator`, *optional*):
                Source of all randomness (timesteps, bit flips, chain conditions, Gibbs sweeps).

        1. `x^{(t-1)}` ~ flips of `x_0` with the cumulative probability of level `t - 1`; `x^{(t)}` ~ one more step.
        2. Positive phase: `F_t(x^{(t-1)} | x^{(t)})`.
        3. Negative phase: each fantasy chain takes the condition `(x^{(t)}, t)` of a random batch element, runs
           `pcd_k` Gibbs sweeps from its stored state (PCD) or from that element's `x^{(t-1)}` (CD), and is stored
           back in training mode.
        4. `loss = (mean F_pos - mean F_neg) / N_v + dsm_weight * dsm` (`+ field_network_x0_weight * x0_loss` with a
           field network).
        """
        config = self.config
        self._check_spins("pixel_values", pixel_values)
        device = self.couplings.device
        B = pixel_values.shape[0]
        x0 = self.binarize(pixel_values.to(device))
        gen_device = generator.device if generator is not None else device
        if timesteps is None:
            draws = B if config.timestep_sampling == "per_sample" else 1
            timesteps = torch.randint(0, config.num_train_timesteps, (draws,), generator=generator, device=gen_device)
            timesteps = timesteps.expand(B)
        t = torch.as_tensor(timesteps).to(device=device, dtype=torch.long)
        t_cpu = t.cpu()
        prev_prob = torch.where(t_cpu > 0, self._cumulative_probs[(t_cpu - 1).clamp(min=0)], 0.0)
        x_prev = flip_spins(x0, prev_prob.to(device), generator)
        x_t = flip_spins(x_prev, self._step_probs[t_cpu].to(device), generator)

        graph = self.graph(device)
        # one timestep for the whole batch: shared couplings (E,), and the sweeps use one sparse matmul per colour
        same_t = bool((t == t[0]).all())
        couplings, fields, x0_logits = self._step_tensors(x_t, t[0] if same_t else t, return_x0_logits=True)
        v_pos = self._state(x_prev, None)
        positive = self._free_energy(v_pos, couplings, fields, graph)

        # negative phase: chain k is conditioned on batch element cond[k]
        K = config.num_fantasy_chains
        cond = torch.randint(0, B, (K,), generator=generator, device=gen_device).to(device)
        chain_couplings, chain_fields = (couplings if same_t else couplings[cond]), fields[cond]
        start = self.fantasy_chains if config.persistent_chains else x_prev[cond]
        chains = gibbs_sweeps(
            self._state(start, None), chain_couplings.detach(), chain_fields.detach(), graph, config.pcd_k, generator
        )
        chain_v = chains[:, : self.num_visible]
        if self.training and config.persistent_chains:
            with torch.no_grad():
                self.fantasy_chains.copy_(chain_v.reshape(self.fantasy_chains.shape))
        v_neg = F.pad(chain_v, (0, self.num_sites - self.num_visible)).detach()
        negative = self._free_energy(v_neg, chain_couplings, chain_fields, graph)
        cd_loss = (positive.mean() - negative.mean()) / self.num_visible

        gap = self._flip_free_energy_gap(v_pos, couplings, fields, graph)  # (B, N_v)
        if config.dsm_loss == "pseudo_likelihood":
            dsm_loss = F.softplus(-gap).mean()  # -log sigmoid(gap) = -log p(x_i | x_-i, x_t)
        else:
            dsm_loss = torch.sigmoid(-gap).pow(2).mean()  # ratio matching: p(flipped x_i | rest)^2
        loss = cd_loss + config.dsm_weight * dsm_loss
        x0_loss = None
        if x0_logits is not None:
            x0_loss = F.binary_cross_entropy_with_logits(x0_logits, (x0 > 0).to(x0_logits.dtype))
            loss = loss + config.field_network_x0_weight * x0_loss

        output = DTMOutput(
            loss=loss,
            cd_loss=cd_loss,
            dsm_loss=dsm_loss,
            x0_loss=x0_loss,
            positive_free_energy=positive,
            negative_free_energy=negative,
            timesteps=t,
            noisy_sample=x_t,
            target_sample=x_prev,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["DTMModel", "DTMOutput", "DTMPreTrainedModel"]

"""Rein: learnable tokens that refine the features of a frozen backbone, layer by layer.

This module is the method and nothing else: it knows tokens and features, not DINOv2.
A backbone wrapper calls :meth:`Reins.forward` after each of its blocks and, for Rein-link,
:meth:`Reins.queries` once to obtain the object queries of the decode head.

Per layer ``l`` with patch features ``f`` (B, N, C) and tokens ``T`` (m, C)::

    S       = softmax(f @ T^T * C**-0.5)                    # (B, N, m), over tokens
    delta_b = S[..., 1:] @ mlp_token2feat(T[1:])            # the first token is a "sink"
    delta   = mlp_delta_f(delta_b + f)
    f'      = f + scale * delta

Variants of the paper's ablation, all switches of :class:`Reins`:

* Rein-core: ``share_mlps=False`` (MLPs per layer), ``link_token_to_query=False``.
* Rein-share: ``share_mlps=True`` (one ``mlp_token2feat`` / ``mlp_delta_f`` for all layers).
* Rein-LoRA: :class:`LoRAReins`, tokens ``T_l = A_l @ B_l`` with rank ``lora_dim``.
* Rein-link: ``link_token_to_query=True`` adds ``transform`` and ``merge`` that turn the
  tokens of all layers into (token_length, query_dims) object queries.

Parameter names (``learnable_tokens``, ``learnable_tokens_a``/``_b``, ``mlp_token2feat``,
``mlp_delta_f``, ``transform``, ``merge``, ``scale``) follow the official implementation so that
its checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Reins", "LoRAReins"]


class Reins(nn.Module):
    """Rein with full-rank tokens (one ``token_length x embed_dims`` matrix per layer).

    Args:
        num_layers: number of backbone blocks Rein follows (one token set each).
        embed_dims: channel width C of the backbone features.
        patch_size: backbone patch size; only used by the token initialisation.
        query_dims: width Q of the object queries produced by Rein-link.
        token_length: number of tokens m per layer (= number of object queries).
        use_softmax: scale by C**-0.5 and softmax over tokens (the paper's setting).
        link_token_to_query: build ``transform``/``merge`` (Rein-link).
        scale_init: initial value of the learnable output scale ``s``.
        zero_mlp_delta_f: zero-init ``mlp_delta_f`` and use a fixed scale of 1.0.
        share_mlps: share ``mlp_token2feat``/``mlp_delta_f`` across layers (Rein-share).
    """

    def __init__(
        self,
        num_layers: int,
        embed_dims: int,
        patch_size: int,
        query_dims: int = 256,
        token_length: int = 100,
        use_softmax: bool = True,
        link_token_to_query: bool = True,
        scale_init: float = 1e-3,
        zero_mlp_delta_f: bool = False,
        share_mlps: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1 or embed_dims < 1 or token_length < 2:
            raise ValueError(
                f"Reins needs num_layers >= 1, embed_dims >= 1 and token_length >= 2 "
                f"(the first token is a sink); got {num_layers}, {embed_dims}, {token_length}"
            )
        self.num_layers = num_layers
        self.embed_dims = embed_dims
        self.patch_size = patch_size
        self.query_dims = query_dims
        self.token_length = token_length
        self.use_softmax = use_softmax
        self.link_token_to_query = link_token_to_query
        self.scale_init = scale_init
        self.zero_mlp_delta_f = zero_mlp_delta_f
        self.share_mlps = share_mlps
        self.create_model()

    # -- construction -------------------------------------------------------------------------
    def create_model(self) -> None:
        """Create the parameters; subclasses replace :meth:`_create_tokens`."""
        self._create_tokens()
        n_mlps = 1 if self.share_mlps else self.num_layers
        self.mlp_token2feat = self._mlps(n_mlps)
        self.mlp_delta_f = self._mlps(n_mlps)
        if self.zero_mlp_delta_f:
            self.register_buffer("scale", torch.tensor(1.0), persistent=False)
        else:
            self.scale = nn.Parameter(torch.tensor(float(self.scale_init)))
        if self.link_token_to_query:
            self.transform = nn.Linear(self.embed_dims, self.query_dims)
            self.merge = nn.Linear(self.query_dims * 3, self.query_dims)
        self.reset_parameters()

    def _mlps(self, n: int) -> nn.Module:
        if n == 1:
            return nn.Linear(self.embed_dims, self.embed_dims)
        return nn.ModuleList(nn.Linear(self.embed_dims, self.embed_dims) for _ in range(n))

    def _create_tokens(self) -> None:
        self.learnable_tokens = nn.Parameter(
            torch.empty(self.num_layers, self.token_length, self.embed_dims)
        )

    def _token_init_bound(self) -> float:
        return math.sqrt(6.0 / float(3 * self.patch_size**2 + self.embed_dims))

    def _init_tokens(self) -> None:
        bound = self._token_init_bound()
        nn.init.uniform_(self.learnable_tokens, -bound, bound)

    def reset_parameters(self) -> None:
        """Initialise as the official code: uniform tokens, kaiming-uniform(a=sqrt 5) MLPs."""
        self._init_tokens()
        for mlps in (self.mlp_token2feat, self.mlp_delta_f):
            for lin in mlps if isinstance(mlps, nn.ModuleList) else [mlps]:
                lin.reset_parameters()  # kaiming_uniform_(a=sqrt(5)) + fan-in uniform bias
        if self.zero_mlp_delta_f:
            for lin in self._layers(self.mlp_delta_f):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)

    @staticmethod
    def _layers(mlps: nn.Module) -> list[nn.Linear]:
        return list(mlps) if isinstance(mlps, nn.ModuleList) else [mlps]  # type: ignore[list-item]

    # -- tokens -------------------------------------------------------------------------------
    def get_tokens(self, layer: int) -> Tensor:
        """Tokens of one layer (m, C), or of all layers (L, m, C) when ``layer == -1``."""
        if layer == -1:
            return self.learnable_tokens
        return self.learnable_tokens[layer]

    def _mlp(self, mlps: nn.Module, layer: int) -> nn.Module:
        return mlps if not isinstance(mlps, nn.ModuleList) else mlps[layer]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, feats: Tensor, layer: int, num_prefix_tokens: int = 1) -> Tensor:
        """Refine the features that leave block ``layer``.

        Args:
            feats: (B, P + N, C) tokens, batch first; the first ``num_prefix_tokens`` (class and
                register tokens) pass through untouched.
            layer: index of the block these features come from.
        Returns:
            (B, P + N, C) refined tokens.
        """
        if feats.shape[-1] != self.embed_dims:
            raise ValueError(
                f"Reins was built for embed_dims={self.embed_dims} but got features with "
                f"{feats.shape[-1]} channels; build it with the backbone's width"
            )
        prefix, patches = feats[:, :num_prefix_tokens], feats[:, num_prefix_tokens:]
        delta = self.delta_feat(patches, layer)
        patches = patches + delta * self.scale
        return torch.cat([prefix, patches], dim=1) if num_prefix_tokens else patches

    def delta_feat(self, feats: Tensor, layer: int) -> Tensor:
        """Delta (before ``scale``) for patch features ``feats`` (B, N, C)."""
        tokens = self.get_tokens(layer)  # (m, C)
        attn = feats @ tokens.t()  # (B, N, m)
        if self.use_softmax:
            attn = (attn * self.embed_dims**-0.5).softmax(dim=-1)
        # The first token only takes part in the softmax normaliser ("sink").
        values = self._mlp(self.mlp_token2feat, layer)(tokens[1:])  # (m-1, C)
        delta = attn[..., 1:] @ values  # (B, N, C)
        return self._mlp(self.mlp_delta_f, layer)(delta + feats)

    def queries(self) -> Tensor:
        """Rein-link object queries (token_length, query_dims), shared by all images.

        ``transform`` maps every layer's tokens to Q channels; max, mean and last over layers are
        stacked *per channel* ([q0_max, q0_mean, q0_last, q1_max, ...]) and ``merge`` maps 3Q->Q.
        """
        if not self.link_token_to_query:
            raise RuntimeError("this Reins was built with link_token_to_query=False (no queries)")
        t = self.transform(self.get_tokens(-1))  # (L, m, Q)
        stacked = torch.stack([t.amax(dim=0), t.mean(dim=0), t[-1]], dim=-1)  # (m, Q, 3)
        return self.merge(stacked.flatten(-2))  # (m, Q)


class LoRAReins(Reins):
    """Rein-LoRA: tokens of layer ``l`` are ``A_l @ B_l`` (A: m x r, B: r x C)."""

    def __init__(self, *args, lora_dim: int = 16, **kwargs) -> None:
        self.lora_dim = lora_dim
        super().__init__(*args, **kwargs)

    def _create_tokens(self) -> None:
        self.learnable_tokens_a = nn.Parameter(
            torch.empty(self.num_layers, self.token_length, self.lora_dim)
        )
        self.learnable_tokens_b = nn.Parameter(
            torch.empty(self.num_layers, self.lora_dim, self.embed_dims)
        )

    def _init_tokens(self) -> None:
        bound = math.sqrt(
            6.0 / float(3 * self.patch_size**2 + (self.embed_dims * self.lora_dim) ** 0.5)
        )
        nn.init.uniform_(self.learnable_tokens_a, -bound, bound)
        nn.init.uniform_(self.learnable_tokens_b, -bound, bound)

    def get_tokens(self, layer: int) -> Tensor:
        if layer == -1:
            return self.learnable_tokens_a @ self.learnable_tokens_b  # (L, m, C)
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]

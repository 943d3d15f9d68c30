"""Rein with two token branches: the shared skeleton of FADA (NeurIPS 2024) and SET (ACM MM 2024).

Spec: ../shared/docs/methods/fada.md, section 12 ("Shared design"). Both successors keep Rein's
tokens and Rein-link and refine the patch features ``f`` (B, N, C) of block ``l`` in two
branches. A method supplies ``split(f) -> (f1, f2)`` and ``combine(D1, D2) -> D``::

    f1, f2 = split(f)                                            # widths (d1, d2)
    D1 = mlp_delta_f(softmax(f1 @ T1^T * C**-0.5)[..., 1:] @ mlp_token2feat(T1[1:]) + f1)
    D2 = mlp_delta_f2(softmax(IN(f2 @ T2^T) * C**-0.5)[..., 1:] @ mlp_token2feat2(T2[1:]) + f2)
    f' = f + scale * combine(D1, D2)

* the temperature is always that of the full width C, in both branches;
* ``IN`` is instance norm over the m tokens of each (image, token) (biased variance, no affine,
  token 0 included), before the temperature and softmax, on branch 2 only;
* token 0 of each branch only takes part in the softmax normaliser, as in Rein;
* ``scale`` is one scalar for both branches and all layers; the four MLPs are shared by all
  layers; the Rein-link queries (``transform``, ``merge``) come from the branch-1 tokens.

Each branch's tokens are LoRA factors (``learnable_tokens_a/_b`` for branch 1,
``learnable_tokens_a2/_b2`` for branch 2) or full rank (``learnable_tokens`` /
``learnable_tokens2``), chosen per branch; the names are the official ones so that checkpoints
map one to one. :class:`TwoBranchMethod` is the method side (freezing, queries, reporting) both
share.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rein.methods.base import TuningMethod
from rein.reins import Reins

if TYPE_CHECKING:
    from rein.config import ModelConfig

__all__ = ["TwoBranchReins", "TwoBranchMethod"]

_IN_EPS = 1e-5  # F.instance_norm's default


class TwoBranchReins(Reins):
    """Two Rein branches on a pluggable split of the features (subclasses: FADA, SET).

    Args (beyond :class:`~rein.reins.Reins`'s; the MLPs are always shared across layers):
        branch_dims: widths (d1, d2) of the two branches.
        branch_lora: per branch, whether its tokens are LoRA factors of rank ``lora_dim``
            (ignored, i.e. full rank, when ``lora_dim`` is None).
        lora_dim: rank of the LoRA token factors.
    """

    #: the order in which the official module creates its token tensors (state_dict order)
    token_order: ClassVar[tuple[int, int]] = (1, 2)

    def __init__(
        self,
        num_layers: int,
        embed_dims: int,
        patch_size: int,
        branch_dims: tuple[int, int],
        branch_lora: tuple[bool, bool] = (True, True),
        query_dims: int = 256,
        token_length: int = 100,
        lora_dim: int | None = 16,
        use_softmax: bool = True,
        link_token_to_query: bool = True,
        scale_init: float = 1e-3,
        zero_mlp_delta_f: bool = False,
    ) -> None:
        self.branch_dims = (int(branch_dims[0]), int(branch_dims[1]))
        self.lora_dim = lora_dim
        self.branch_lora = (bool(lora_dim) and branch_lora[0], bool(lora_dim) and branch_lora[1])
        super().__init__(
            num_layers=num_layers,
            embed_dims=embed_dims,
            patch_size=patch_size,
            query_dims=query_dims,
            token_length=token_length,
            use_softmax=use_softmax,
            link_token_to_query=link_token_to_query,
            scale_init=scale_init,
            zero_mlp_delta_f=zero_mlp_delta_f,
            share_mlps=True,
        )

    # -- construction: scale, tokens, the four MLPs, the split's own tensors, transform, merge --
    def create_model(self) -> None:
        d1, d2 = self.branch_dims
        if self.zero_mlp_delta_f:
            self.register_buffer("scale", torch.tensor(1.0), persistent=False)
        else:
            self.scale = nn.Parameter(torch.tensor(float(self.scale_init)))
        for branch in self.token_order:
            self._create_branch_tokens(branch)
        self.mlp_token2feat = nn.Linear(d1, d1)
        self.mlp_delta_f = nn.Linear(d1, d1)
        self.mlp_token2feat2 = nn.Linear(d2, d2)
        self.mlp_delta_f2 = nn.Linear(d2, d2)
        self.create_split_params()
        if self.link_token_to_query:
            self.transform = nn.Linear(d1, self.query_dims)
            self.merge = nn.Linear(self.query_dims * 3, self.query_dims)
        self.reset_parameters()

    def create_split_params(self) -> None:
        """Tensors of the split / combine (FADA's filters); none by default."""

    def reset_split_params(self) -> None:
        """Initialise what :meth:`create_split_params` made."""

    @staticmethod
    def _suffix(branch: int) -> str:
        return "" if branch == 1 else "2"

    def _create_branch_tokens(self, branch: int) -> None:
        layers, m, width, s = (
            self.num_layers,
            self.token_length,
            self.branch_dims[branch - 1],
            self._suffix(branch),
        )
        if self.branch_lora[branch - 1]:
            r = self.lora_dim
            setattr(self, f"learnable_tokens_a{s}", nn.Parameter(torch.empty(layers, m, r)))
            setattr(self, f"learnable_tokens_b{s}", nn.Parameter(torch.empty(layers, r, width)))
        else:
            setattr(self, f"learnable_tokens{s}", nn.Parameter(torch.empty(layers, m, width)))

    def _token_bounds(self) -> tuple[float, float]:
        """Uniform init bounds of the (branch 1, branch 2) tokens (spec section 9).

        Rein's formulas: full rank sqrt(6 / (3 p^2 + d)), LoRA sqrt(6 / (3 p^2 + sqrt(d r))),
        where d is the branch width, except that branch 1's LoRA bound uses the full width C
        (the official code inherits Rein-LoRA's bound for its first token set). FADA: low LoRA
        with C, high with 3C/4; SET: both branches are C wide, so every bound is Rein's at C.
        """
        p2 = 3 * self.patch_size**2
        bounds = []
        for branch in (1, 2):
            width = self.branch_dims[branch - 1]
            if self.branch_lora[branch - 1]:
                fan = (self.embed_dims if branch == 1 else width) * self.lora_dim
                bounds.append(math.sqrt(6.0 / (p2 + fan**0.5)))
            else:
                bounds.append(math.sqrt(6.0 / (p2 + width)))
        return bounds[0], bounds[1]

    def _token_tensors(self, branch: int) -> list[Tensor]:
        s = self._suffix(branch)
        if self.branch_lora[branch - 1]:
            return [
                getattr(self, f"learnable_tokens_a{s}"),
                getattr(self, f"learnable_tokens_b{s}"),
            ]
        return [getattr(self, f"learnable_tokens{s}")]

    def reset_parameters(self) -> None:
        """Uniform tokens (:meth:`_token_bounds`), kaiming-uniform(a=sqrt 5) MLPs with torch's
        default bias init, the split's own init."""
        for branch, bound in zip((1, 2), self._token_bounds()):
            for t in self._token_tensors(branch):
                nn.init.uniform_(t, -bound, bound)
        mlps = (self.mlp_token2feat, self.mlp_delta_f, self.mlp_token2feat2, self.mlp_delta_f2)
        for lin in mlps:
            lin.reset_parameters()
        if self.zero_mlp_delta_f:
            for lin in (self.mlp_delta_f, self.mlp_delta_f2):
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.reset_split_params()

    # -- tokens -------------------------------------------------------------------------------
    def _tokens(self, branch: int, layer: int) -> Tensor:
        ts = self._token_tensors(branch)
        if layer != -1:
            ts = [t[layer] for t in ts]
        return ts[0] @ ts[1] if len(ts) == 2 else ts[0]

    def get_tokens(self, layer: int) -> Tensor:
        """Branch-1 tokens (m, d1) of one layer, or (L, m, d1) for ``layer == -1`` (these also
        make the Rein-link queries)."""
        return self._tokens(1, layer)

    def get_tokens2(self, layer: int) -> Tensor:
        """Branch-2 tokens (m, d2) of one layer, or (L, m, d2) for ``layer == -1``."""
        return self._tokens(2, layer)

    # -- the refinement -----------------------------------------------------------------------
    def split(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Patch features (B, N, C) -> branch inputs (B, N, d1), (B, N, d2)."""
        raise NotImplementedError

    def combine(self, delta1: Tensor, delta2: Tensor) -> Tensor:
        """Branch outputs (B, N, d1), (B, N, d2) -> the delta (B, N, C), before ``scale``."""
        raise NotImplementedError

    def _branch(
        self, f: Tensor, tokens: Tensor, token2feat: nn.Module, delta_f: nn.Module, inorm: bool
    ) -> Tensor:
        attn = f @ tokens.t()  # (B, N, m)
        if inorm:  # instance norm over the m tokens (biased variance, no affine), token 0 too
            attn = F.layer_norm(attn, attn.shape[-1:], eps=_IN_EPS)
        if self.use_softmax:
            attn = (attn * self.embed_dims**-0.5).softmax(dim=-1)  # the full C, both branches
        delta = attn[..., 1:] @ token2feat(tokens[1:])  # token 0 is a sink, as in Rein
        return delta_f(delta + f)

    def delta_feat(self, feats: Tensor, layer: int) -> Tensor:
        """Delta (before ``scale``) for patch features ``feats`` (B, N, C)."""
        f1, f2 = self.split(feats)
        d1 = self._branch(f1, self.get_tokens(layer), self.mlp_token2feat, self.mlp_delta_f, False)
        d2 = self._branch(
            f2, self.get_tokens2(layer), self.mlp_token2feat2, self.mlp_delta_f2, True
        )
        return self.combine(d1, d2)

    def extra_repr(self) -> str:
        d1, d2 = self.branch_dims
        lora = "/".join(str(self.lora_dim) if b else "full" for b in self.branch_lora)
        return (
            f"layers={self.num_layers}, dims={self.embed_dims} ({d1}+{d2}), "
            f"tokens={self.token_length}, lora_dim={lora}"
        )


class TwoBranchMethod(TuningMethod):
    """The foundation model is frozen; the two-branch module (``backbone.reins.*``) and the
    decode head train. Subclasses build the module from :meth:`module_kwargs`."""

    #: keys only this method's official module has (its checkpoints are told apart by them)
    official_keys: ClassVar[tuple[str, ...]] = ()

    def module_kwargs(self, backbone: nn.Module, model_cfg: ModelConfig) -> dict[str, Any]:
        """The :class:`TwoBranchReins` arguments every method takes from ``model.rein``."""
        if getattr(backbone, "stage_strides", None) is not None:
            raise ValueError(
                f"tuning '{self.name}' refines the tokens of a ViT after every block; "
                f"{type(backbone).__name__} is hierarchical: use rein"
            )
        rein_cfg = model_cfg.rein
        if not rein_cfg.share_mlps:
            raise ValueError(
                f"tuning '{self.name}' shares its MLPs across layers (as the official code): "
                "set model.rein.share_mlps: true"
            )
        return dict(
            num_layers=backbone.depth,
            embed_dims=backbone.embed_dim,
            patch_size=backbone.patch_size,
            query_dims=model_cfg.head.feat_channels,
            token_length=rein_cfg.token_length,
            lora_dim=rein_cfg.lora_dim,
            link_token_to_query=rein_cfg.link_token_to_query,
            scale_init=rein_cfg.scale_init,
            zero_mlp_delta_f=rein_cfg.zero_mlp_delta_f,
        )

    def supplies_queries(self, backbone: nn.Module) -> bool:
        reins = getattr(backbone, "reins", None)
        return reins is not None and bool(getattr(reins, "link_token_to_query", False))

    def is_trainable(self, name: str) -> bool:
        return name.startswith("backbone.reins.")

    def report_group(self, name: str) -> str | None:
        return self.name if name.startswith("backbone.reins.") else None

    @classmethod
    def claims_official(cls, keys: Collection[str]) -> bool:
        return any(k.startswith(cls.official_keys) for k in keys)

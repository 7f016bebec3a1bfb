"""Singular Value Fine-tuning (SVF) layers.

A conv weight ``W`` of shape ``[Co, Ci, kh, kw]`` is folded to a ``Co x (Ci*kh*kw)`` matrix and
decomposed with a full-rank SVD ``W = U diag(s) V^T`` (rank ``R = min(Co, Ci*kh*kw)``, never
rounded). ``U`` and ``V`` are frozen buffers; only the singular values train.

A grouped conv (``groups = g``, e.g. EfficientNet's depthwise convs) is the block-diagonal matrix of
its ``g`` groups, and ``grouped_fold`` says how it is decomposed:

* ``"per-group"`` (default): each group on its own (``R = g * min(Co/g, Ci/g*kh*kw)``), so a depthwise
  conv has one singular value per channel: the norm of that channel's filter.
* ``"shared"``: the weight folded literally, to ``Co x (Ci/g*kh*kw)``, and decomposed once: each
  filter is a combination (a row of ``U``) of ``R = min(Co, Ci/g*kh*kw)`` filters shared by every
  group (the rows of ``V^T``; 9 for a 3x3 depthwise conv), and a singular value scales one shared
  filter in every channel at once.
* ``"kernel"`` (depthwise convs only): each channel's ``kh x kw`` filter is itself the matrix, so a
  3x3 filter is a sum of 3 separable rank-1 filters ``u_i v_i^T`` and its 3 singular values weigh
  them: the values can reshape a filter (``R = g * min(kh, kw)``), not only rescale it.

Two parametrisations (SVF paper, appendix D.2):

* ``"direct"``: ``s`` itself is the parameter.
* ``"exp"``: ``s = s0 * exp(d)`` with ``d`` the parameter, initialised at 0.

Two forward forms, chosen per call:

* ``"three_layer"`` (the official form): ``kxk`` conv with ``V^T`` -> per-channel scale by ``s``
  -> ``1x1`` conv with ``U`` (+ bias).
* ``"recompose"``: build ``(U * s) @ V^T`` and run one conv; autograd must then form the full
  weight gradient. Grouped layers folded ``"shared"`` or ``"kernel"`` always train this way (the
  weight is tiny, while the three-layer form would run every basis filter in every group).

Whenever no gradient can reach the singular values (``torch.no_grad()``, or frozen), the layer runs
one conv with a cached recomposed weight, so inference costs what the plain layer costs.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

try:  # timm's "same" padding conv (TF-ported weights); optional at import time.
    from timm.layers import Conv2dSame, pad_same
except ImportError:  # pragma: no cover - timm is a hard requirement of the package
    Conv2dSame, pad_same = None, None

logger = logging.getLogger(__name__)

Parametrization = Literal["direct", "exp"]
Form = Literal["three_layer", "recompose"]
GroupedFold = Literal["per-group", "shared", "kernel"]
GROUPED_FOLDS: tuple[str, ...] = ("per-group", "shared", "kernel")
# Measured by benchmarks/svf_forward.py (see README): the three-layer form trains faster than
# recomposing the weight on both backbones, so it is the default training form.
DEFAULT_TRAIN_FORM: Form = "three_layer"


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-rank SVD in float64 with a deterministic sign convention.

    Args:
        matrix: ``[M, N]``, or a batch ``[G, M, N]`` decomposed matrix by matrix.

    Returns:
        ``U [(G,) M, R]``, ``s [(G,) R]`` (descending), ``Vh [(G,) R, N]`` with ``R = min(M, N)``, in
        float64. Each column of ``U`` has its largest-magnitude entry positive (sklearn's ``svd_flip``).
    """
    matrix = matrix.detach().double()
    if matrix.shape[-2] < matrix.shape[-1]:  # LAPACK is 2-3x faster on the tall transpose of a wide matrix
        v, s, uh = torch.linalg.svd(matrix.mT, full_matrices=False)
        u, vh = uh.mT, v.mT
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    signs = torch.sign(u.gather(-2, u.abs().argmax(-2, keepdim=True)))  # [(G,) 1, R]
    signs[signs == 0] = 1.0
    return u * signs, s, vh * signs.mT


class _SingularValues(nn.Module):
    """Holds the trainable singular values of one layer in either parametrisation."""

    def __init__(self, s0: torch.Tensor, parametrization: Parametrization) -> None:
        super().__init__()
        if parametrization not in ("direct", "exp"):
            raise ValueError(f"parametrization must be 'direct' or 'exp', got {parametrization!r}")
        self.parametrization = parametrization
        self.register_buffer("s0", s0.clone())
        if parametrization == "direct":
            self.s = nn.Parameter(s0.clone())
        else:
            self.d = nn.Parameter(torch.zeros_like(s0))

    @property
    def trainable(self) -> nn.Parameter:
        """The tensor the optimiser updates (``s`` or ``d``)."""
        return self.s if self.parametrization == "direct" else self.d

    def forward(self) -> torch.Tensor:
        """Current singular values ``[R]``."""
        if self.parametrization == "direct":
            return self.s
        return self.s0 * torch.exp(self.d)


class SVFLayer(nn.Module):
    """Common machinery of :class:`SVFConv2d` and :class:`SVFLinear`.

    Buffers: ``U [Co, R]``, ``Vh [R, Ci*kh*kw]``, ``bias [Co]`` (optional, frozen); for ``groups = g``
    one decomposition per group: ``U [g, Co/g, Rg]``, ``Vh [g, Rg, Ci/g*kh*kw]`` and ``R = g * Rg``;
    folded ``"shared"`` one for the whole filter bank: ``U [Co, R]``, ``Vh [R, Ci/g*kh*kw]``; folded
    ``"kernel"`` (depthwise) one per channel's filter: ``U [g, kh, Rg]``, ``Vh [g, Rg, kw]``.
    Parameters: the singular values ``[R]`` (group-major), in ``self.sv`` (see :class:`_SingularValues`).
    """

    U: torch.Tensor
    Vh: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        parametrization: Parametrization,
        form: Form,
        groups: int = 1,
        grouped_fold: GroupedFold = "per-group",
    ) -> None:
        super().__init__()
        if grouped_fold not in GROUPED_FOLDS:
            raise ValueError(f"grouped_fold must be one of {', '.join(GROUPED_FOLDS)}, got {grouped_fold!r}")
        self.grouped_fold: GroupedFold = grouped_fold if groups > 1 else "per-group"
        if self.grouped_fold == "kernel" and not (weight.dim() == 4 and weight.shape[0] == groups
                                                  and weight.shape[1] == 1):
            raise ValueError(f"grouped_fold 'kernel' needs a depthwise conv (one input and one output channel "
                             f"per group), got weight {tuple(weight.shape)} with groups={groups}")
        if groups == 1 or self.grouped_fold == "shared":
            matrix = weight.detach().reshape(weight.shape[0], -1)
        elif self.grouped_fold == "kernel":
            matrix = weight.detach().reshape(groups, weight.shape[2], weight.shape[3])
        else:
            matrix = weight.detach().reshape(groups, weight.shape[0] // groups, -1)
        u, s, vh = _svd(matrix)
        dtype = weight.dtype
        self.register_buffer("U", u.to(dtype).contiguous())
        self.register_buffer("Vh", vh.to(dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.sv = _SingularValues(s.reshape(-1).to(dtype), parametrization)
        self.groups = groups
        self.weight_shape = tuple(weight.shape)
        self.form: Form = form
        self._cache_key: tuple | None = None
        self._cached_weight: torch.Tensor | None = None

    @property
    def shared_basis(self) -> bool:
        """Whether a grouped conv is folded as one filter bank (``grouped_fold == "shared"``)."""
        return self.grouped_fold == "shared"

    @property
    def rank(self) -> int:
        """Number of singular values (summed over the groups)."""
        return self.sv.s0.numel()

    @property
    def kind(self) -> str:
        """``"1x1"``, ``"3x3"`` (any spatial kernel, e.g. ``"7x7"``) or ``"linear"``; grouped convs
        add ``" depthwise"`` (one input channel per group) or ``" grouped"``, then ``" shared"`` or
        ``" kernel"`` for those folds."""
        if len(self.weight_shape) == 2:
            return "linear"
        kernel = f"{self.weight_shape[2]}x{self.weight_shape[3]}"
        if self.groups == 1:
            return kernel
        kind = f"{kernel} {'depthwise' if self.weight_shape[1] == 1 else 'grouped'}"
        return kind if self.grouped_fold == "per-group" else f"{kind} {self.grouped_fold}"

    def singular_values(self) -> torch.Tensor:
        """Current singular values ``[R]``."""
        return self.sv()

    def recomposed_weight(self) -> torch.Tensor:
        """``(U * s) @ Vh`` (per group) as ``[Co, Ci/groups*kh*kw]`` (differentiable in ``s``)."""
        if self.groups == 1 or self.shared_basis:
            return (self.U * self.sv()) @ self.Vh
        s = self.sv().reshape(self.groups, 1, -1)
        return ((self.U * s) @ self.Vh).reshape(self.weight_shape[0], -1)

    def _inference_weight(self) -> torch.Tensor:
        param = self.sv.trainable
        key = (param._version, param.data_ptr(), param.dtype, param.device, self.U.data_ptr())
        if self._cache_key != key or self._cached_weight is None:
            with torch.no_grad():
                self._cached_weight = self.recomposed_weight().reshape(self.weight_shape)
            self._cache_key = key
        return self._cached_weight

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and self.sv.trainable.requires_grad

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module signature
        self._cache_key, self._cached_weight = None, None
        return super()._apply(fn, recurse)


class SVFConv2d(SVFLayer):
    """SVF replacement of a :class:`torch.nn.Conv2d` (any kernel/stride/dilation; grouped convs are
    decomposed group by group).

    Input ``[N, Ci, H, W]`` -> output ``[N, Co, H', W']``, identical to the source conv at init.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        parametrization: Parametrization = "direct",
        form: Form = DEFAULT_TRAIN_FORM,
        grouped_fold: GroupedFold = "per-group",
    ) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")
        super().__init__(conv.weight, conv.bias, parametrization, form, groups=conv.groups,
                         grouped_fold=grouped_fold)
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.kernel_size = conv.kernel_size
        self.same_pad = Conv2dSame is not None and isinstance(conv, Conv2dSame)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            return pad_same(x, self.kernel_size, self.stride, self.dilation)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pad(x)
        if not self._needs_grad():
            weight = self._inference_weight()
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        # A shared basis would make the three-layer form run every basis filter in every group
        # (g*R channels), while its recomposed weight is tiny; a kernel fold has no V^T conv.
        if self.form == "recompose" or self.grouped_fold != "per-group":
            weight = self.recomposed_weight().reshape(self.weight_shape)
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        h = self._project(x) * self.sv()[None, :, None, None]
        return F.conv2d(h, self.U.reshape(self.weight_shape[0], -1)[:, :, None, None], self.bias,
                        groups=self.groups)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``V^T x`` (per group) on the padded input: ``[N, R, H', W']``, or ``[N, g*R, H', W']``
        (group-major) with a shared basis; folded ``"kernel"``, each channel's response to its rank-1
        filters ``u_i v_i^T`` (``[N, R, H', W']``, group-major)."""
        co, ci, kh, kw = self.weight_shape
        if self.grouped_fold == "kernel":
            rank1 = self.U.mT[..., :, None] * self.Vh[..., None, :]  # [g, Rg, kh, kw]
            return F.conv2d(x, rank1.reshape(-1, 1, kh, kw), None, self.stride, self.padding, self.dilation,
                            self.groups)
        vh = self.Vh.reshape(-1, ci, kh, kw)
        if self.shared_basis:
            vh = vh.repeat(self.groups, 1, 1, 1)
        return F.conv2d(x, vh, None, self.stride, self.padding, self.dilation, self.groups)

    def components(self, x: torch.Tensor) -> torch.Tensor:
        """Rank-R intermediate response ``s * (V^T x)``: ``[N, R, H', W']`` (for cue maps). With a
        shared basis each component answers in every group; its map is then the root mean square
        over the groups."""
        h = self._project(self._pad(x))
        if self.shared_basis:
            n, _, height, width = h.shape
            h = h.reshape(n, self.groups, self.rank, height, width).pow(2).mean(1).sqrt()
        return h * self.sv()[None, :, None, None]

    def to_plain(self) -> nn.Conv2d:
        """A plain conv (``Conv2dSame`` where the source was one) with the tuned weight."""
        co, ci, kh, kw = self.weight_shape
        cls = Conv2dSame if self.same_pad else nn.Conv2d
        conv = cls(ci * self.groups, co, (kh, kw), stride=self.stride, padding=0 if self.same_pad else self.padding,
                   dilation=self.dilation, groups=self.groups, bias=self.bias is not None)
        conv = conv.to(device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.recomposed_weight().reshape(self.weight_shape))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(False)
        if conv.bias is not None:
            conv.bias.requires_grad_(False)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.weight_shape[1] * self.groups}, {self.weight_shape[0]}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}, stride={self.stride}, dilation={self.dilation}, groups={self.groups}, "
                f"parametrization={self.sv.parametrization}, form={self.form}")


class SVFLinear(SVFLayer):
    """SVF replacement of :class:`torch.nn.Linear`: ``[..., Ci] -> [..., Co]``."""

    def __init__(
        self,
        linear: nn.Linear,
        parametrization: Parametrization = "direct",
        form: Form = DEFAULT_TRAIN_FORM,
    ) -> None:
        super().__init__(linear.weight, linear.bias, parametrization, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._needs_grad():
            return F.linear(x, self._inference_weight(), self.bias)
        if self.form == "recompose":
            return F.linear(x, self.recomposed_weight(), self.bias)
        return F.linear(F.linear(x, self.Vh) * self.sv(), self.U, self.bias)

    def components(self, x: torch.Tensor) -> torch.Tensor:
        """Rank-R intermediate response ``s * (V^T x)``: ``[..., R]``."""
        return F.linear(x, self.Vh) * self.sv()

    def to_plain(self) -> nn.Linear:
        """A plain linear layer with the tuned weight."""
        co, ci = self.weight_shape
        linear = nn.Linear(ci, co, bias=self.bias is not None).to(self.U.device, self.U.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.recomposed_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear


@dataclass(frozen=True)
class SVFStats:
    """Trainable-parameter report of a module after :func:`apply_svf`."""

    layers: int
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (f"SVF: {self.layers} layers, {self.trainable:,} trainable singular values of "
                f"{self.total:,} weights ({100 * self.fraction:.3f}%)")


def _conv_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped"
        kh, kw = module.kernel_size
        return "1x1" if (kh, kw) == (1, 1) else "3x3"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _modules_of(module: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    return [module] if isinstance(module, nn.Module) else list(module)


def svf_layers(module: nn.Module | Iterable[nn.Module], prefix: str = "") -> Iterator[tuple[str, SVFLayer]]:
    """Yield ``(qualified name, layer)`` for every SVF layer inside ``module``."""
    for root in _modules_of(module):
        for name, sub in root.named_modules(prefix=prefix):
            if isinstance(sub, SVFLayer):
                yield name, sub


def svf_parameters(module: nn.Module | Iterable[nn.Module]) -> list[nn.Parameter]:
    """The trainable tensors (``s`` or ``d``) of every SVF layer inside ``module``."""
    return [layer.sv.trainable for _, layer in svf_layers(module)]


def svf_stats(module: nn.Module | Iterable[nn.Module]) -> SVFStats:
    """Count SVF layers, trainable parameters and all weights (SVF layers count their ``Co*Ci*k*k``)."""
    layers = trainable = total = 0
    for root in _modules_of(module):
        for sub in root.modules():
            if isinstance(sub, _SingularValues):
                continue  # its values are the SVF layer's rank, counted above as ``trainable``
            if isinstance(sub, SVFLayer):
                layers += 1
                trainable += sub.rank
                co = sub.weight_shape[0]
                total += co * int(torch.tensor(sub.weight_shape[1:]).prod())
                total += 0 if sub.bias is None else sub.bias.numel()
            else:
                total += sum(p.numel() for p in sub.parameters(recurse=False))
                # Frozen BatchNorms keep their affine weight/bias as buffers; count them so that
                # ``total`` does not shrink when apply_svf freezes a stage.
                total += sum(b.numel() for n, b in sub.named_buffers(recurse=False) if n in ("weight", "bias"))
    return SVFStats(layers, trainable, total)


def _replace(root: nn.Module, build) -> int:  # noqa: ANN001 - build: Callable[[nn.Module], nn.Module|None]
    count = 0
    for name, child in list(root.named_children()):
        new = build(child)
        if new is not None:
            setattr(root, name, new)
            count += 1
        else:
            count += _replace(child, build)
    return count


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen BatchNorm: it stays in eval mode whatever its parent asks."""
    return nn.Module.train(self, False)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Freeze every BatchNorm inside ``module`` (itself included): affine parameters stop training
    and the layer stays in eval mode (running statistics fixed) even under ``model.train()``.

    The layers keep their class and state-dict keys, and run the fused eval kernels.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            m.train = types.MethodType(_eval_only_train, m)
            m.eval()
    return module


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm frozen by :func:`freeze_batchnorm`."""
    is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
    return is_bn and getattr(module.train, "__func__", None) is _eval_only_train


def apply_svf(
    module: nn.Module | Iterable[nn.Module],
    kinds: Iterable[str] = ("1x1", "3x3"),
    parametrization: Parametrization = "direct",
    form: Form = DEFAULT_TRAIN_FORM,
    freeze_rest: bool = True,
    grouped_fold: GroupedFold = "per-group",
) -> nn.Module | list[nn.Module]:
    """Replace every eligible conv/linear inside ``module`` by its SVF layer.

    Args:
        module: a module (e.g. ``backbone.layer3``) or a list of modules (stages).
        kinds: which layers to decompose: ``"1x1"`` convs, ``"3x3"`` (every conv with a spatial
            kernel, 3x3 or larger), ``"linear"``, and ``"grouped"`` (grouped/depthwise convs of any
            kernel, decomposed group by group; the other kinds mean ``groups == 1``).
        parametrization: ``"direct"`` (train ``s``) or ``"exp"`` (train ``d``, ``s = s0 exp(d)``).
        form: training forward form (see module docstring).
        freeze_rest: freeze every other parameter inside ``module`` and turn its BatchNorms into
            frozen BatchNorms, so only singular values train.
        grouped_fold: how grouped convs are decomposed: ``"per-group"``, ``"shared"`` (one filter
            bank with shared basis filters) or ``"kernel"`` (each depthwise filter as a ``kh x kw``
            matrix); see the module docstring.

    Returns:
        ``module`` itself (the same list when a list was given), modified in place. The
        trainable-parameter count and fraction are logged (``svf_stats`` returns them).
    """
    kinds = set(kinds)
    unknown = kinds - {"1x1", "3x3", "linear", "grouped"}
    if unknown:
        raise ValueError(f"unknown SVF kinds {sorted(unknown)}; use '1x1', '3x3', 'linear', 'grouped'")
    roots = _modules_of(module)
    if any(isinstance(r, (SVFLayer, nn.Conv2d, nn.Linear)) for r in roots):
        raise TypeError("apply_svf replaces layers inside a container; pass the stage that holds them")

    def build(child: nn.Module) -> nn.Module | None:
        if isinstance(child, SVFLayer):
            return None
        kind = _conv_kind(child)
        if kind is None or kind not in kinds:
            return None
        if kind == "linear":
            return SVFLinear(child, parametrization, form)
        return SVFConv2d(child, parametrization, form, grouped_fold=grouped_fold)

    for root in roots:
        if freeze_rest:
            for p in root.parameters():
                p.requires_grad_(False)
            freeze_batchnorm(root)
        _replace(root, build)
    stats = svf_stats(roots)
    logger.info("%s", stats)
    return module


def fold_svf(module: nn.Module | Iterable[nn.Module]) -> nn.Module | list[nn.Module]:
    """Replace every SVF layer inside ``module`` by a plain conv/linear with the tuned weight."""
    for root in _modules_of(module):
        _replace(root, lambda child: child.to_plain() if isinstance(child, SVFLayer) else None)
    return module


def within(name: str, paths: Iterable[str]) -> bool:
    """Whether the dotted module ``name`` is one of ``paths`` or inside one (``"layer4.1.conv"`` is
    within ``"layer4.1"``, ``"layer4.10"`` is not)."""
    return any(name == p or name.startswith(p + ".") for p in paths)


def make_adaptable(
    backbone: nn.Module,
    modules: Iterable[str],
    grouped_fold: GroupedFold | None = None,
    parametrization: Parametrization | None = None,
) -> None:
    """Give each of ``backbone``'s ``modules`` (dotted paths such as ``"layer4.1"``) SVF layers to
    adapt: its dense convs are decomposed where none of its layers is yet, and with ``grouped_fold``
    its grouped/depthwise convs too (see :func:`apply_svf`). ``parametrization`` ``None``: that of
    the backbone's SVF layers, ``"direct"`` if it has none."""
    modules = list(modules)
    layers = list(svf_layers(backbone))
    if parametrization is None:
        parametrization = layers[0][1].sv.parametrization if layers else "direct"
    names = [name for name, _ in layers]
    missing = [m for m in modules if not any(within(n, [m]) for n in names)]
    if missing:
        apply_svf([backbone.get_submodule(m) for m in missing], parametrization=parametrization)
    if grouped_fold:
        apply_svf([backbone.get_submodule(m) for m in modules], kinds={"grouped"},
                  parametrization=parametrization, grouped_fold=grouped_fold)


def set_svf_form(module: nn.Module | Iterable[nn.Module], form: Form) -> None:
    """Switch the training forward form of every SVF layer inside ``module``."""
    for _, layer in svf_layers(module):
        layer.form = form

"""Batch augmentation for distillation: affine jitter, mixup / CutMix and function matching.

Two ways to enlarge the transfer set (the inputs the teacher's outputs are matched on):

* :class:`FunctionMatching` -- Beyer et al. 2022, "Knowledge distillation: a good teacher is
  patient and consistent" (arXiv:2106.05237): augment the batch *once* and feed the identical
  tensor to teacher and student ("consistent"), with fresh, strong augmentations at every step
  ("patient"), mixup-mixed so that the student sees inputs between the data points;
* :class:`AugmentedDataset` -- a *fixed* augmented transfer set: sample ``i`` is a deterministic
  function of ``(seed, i)``, so a teacher-output cache keyed on the sample index stays valid.

The building blocks :func:`random_affine`, :func:`mixup` and :func:`cutmix` are pure functions
on ``[N, C, H, W]`` batches that draw their randomness from an explicit ``torch.Generator``.

(Slightly over 500 lines on purpose: the batch transform, the fixed dataset and the pure functions
they both draw from share one seeding scheme, which is easier to check in one file.)
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Optional, Sequence, Sized

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from lightning_distill.validation import check_float

__all__ = ["AugmentedDataset", "FunctionMatching", "cutmix", "cutmix_box", "mixup", "random_affine", "sample_beta"]

_MASK64 = (1 << 64) - 1


def _derive_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value (SplitMix64 finaliser over a running hash).

    Used to give every ``(seed, epoch)``, ``(seed, sample)``... its own generator without the
    collisions of ``seed * K + i``.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h ^= h >> 31
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
    return (h ^ (h >> 31)) >> 1


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_affine_args(
    degrees: Any, translate: Any, scale: Any, prefix: str = ""
) -> tuple[float, float, tuple[float, float]]:
    """Validate the affine-jitter ranges (argument names ``prefix + name``); return them as floats."""
    check_float(f"{prefix}degrees", degrees, 0.0, 180.0,
                what="a number in [0, 180] (rotation drawn from [-degrees, degrees]; 0 = no rotation)")
    check_float(f"{prefix}translate", translate, 0.0, 1.0,
                what="a number in [0, 1] (shift drawn from [-translate, translate] times the image size; 0 = no shift)")
    if (
        isinstance(scale, (str, bytes))
        or not isinstance(scale, Sequence)
        or len(scale) != 2
        or not all(_is_real(s) for s in scale)
        or not 0.0 < scale[0] <= scale[1]
    ):
        raise ValueError(
            f"`{prefix}scale` must be a pair (low, high) of numbers with 0 < low <= high (zoom drawn from [low, high]; "
            f"(1.0, 1.0) = no zoom), got {scale!r}."
        )
    return float(degrees), float(translate), (float(scale[0]), float(scale[1]))


def _check_alpha(name: str, value: Any) -> float:
    return check_float(name, value, 0.0, what="a finite number >= 0 (0 turns it off; 1.0 is a common choice)")


def _check_batch(x: Any, name: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        what = f"a {x.dim()}-D {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"`{name}` must be a floating-point image batch [N, C, H, W], got {what}.")


def _check_perm(perm: Any, n: int) -> None:
    if not isinstance(perm, Tensor) or perm.shape != (n,) or perm.dtype != torch.long:
        got = f"{tuple(perm.shape)} {perm.dtype}" if isinstance(perm, Tensor) else type(perm).__name__
        raise ValueError(f"`perm` must be a long tensor of shape ({n},) (e.g. torch.randperm({n})), got {got}.")


def _log_gamma_sample(alpha: float, generator: Optional[torch.Generator]) -> float:
    """``log`` of one Gamma(alpha, 1) draw (Marsaglia & Tsang 2000), randomness from ``generator``.

    For ``alpha < 1`` the boost ``G(alpha) = G(alpha + 1) * U^(1/alpha)`` is applied in log space,
    so tiny alphas do not underflow to ``log(0)``.
    """
    log_boost = 0.0
    if alpha < 1.0:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        log_boost = math.log(max(u, 1e-300)) / alpha
        alpha += 1.0
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = torch.randn((), generator=generator, dtype=torch.float64).item()
        v = (1.0 + c * z) ** 3
        if v <= 0.0:
            continue
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        if math.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
            return math.log(d * v) + log_boost


def sample_beta(alpha: float, generator: Optional[torch.Generator] = None) -> float:
    """One draw of ``lam ~ Beta(alpha, alpha)`` from ``generator`` (``None``: the global RNG).

    ``torch.distributions.Beta`` cannot take a generator; this samples two Gamma variables
    (Marsaglia-Tsang) and returns ``G1 / (G1 + G2)``, computed as a sigmoid of their log ratio.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> lam = sample_beta(1.0, g)
        >>> 0.0 <= lam <= 1.0 and lam == sample_beta(1.0, torch.Generator().manual_seed(0))
        True
    """
    alpha = _check_alpha("alpha", alpha)
    if alpha == 0.0:
        raise ValueError("`alpha` must be > 0 to sample Beta(alpha, alpha), got 0.")
    diff = _log_gamma_sample(alpha, generator) - _log_gamma_sample(alpha, generator)
    return 1.0 / (1.0 + math.exp(-diff)) if diff > -700.0 else 0.0


def _affine_theta(angle: Tensor, zoom: Tensor, shift: Tensor, height: int, width: int) -> Tensor:
    """``affine_grid`` matrices ``[N, 2, 3]`` for ``p_out = zoom * R(angle) p_in + shift * size``.

    ``p`` are pixel positions relative to the image centre, ``angle`` in radians (clockwise on
    screen for positive angles, as y points down), ``shift`` ``[N, 2]`` as ``(x, y)`` fractions of
    ``(width, height)``. ``affine_grid`` wants the inverse map, from output to input, in normalised
    coordinates ``u = p / (size / 2)``: ``A = D^-1 R(-angle) D / zoom`` with ``D = diag(w/2, h/2)``.
    """
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-a) / s, [N, 2, 2]
    half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64)
    inv_norm = inv * half[None, None, :] / half[None, :, None]  # D^-1 A D, D = diag(w/2, h/2)
    t_norm = shift * 2.0  # a shift of `translate * size` pixels is `2 * translate` normalised units
    offset = -(inv_norm @ t_norm.unsqueeze(-1))
    return torch.cat([inv_norm, offset], dim=-1)


def random_affine(
    x: Tensor,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: Sequence[float] = (0.9, 1.1),
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Per-sample random affine jitter of an image batch, on the batch's device.

    Every sample gets its own rotation ``a ~ U[-degrees, degrees]`` (degrees, about the image
    centre), zoom ``s ~ U[scale]`` and shift ``t ~ U[-translate, translate]`` per axis (a
    fraction of the image width / height). The parameters are drawn on the CPU from
    ``generator`` (reproducible; ``None`` uses the global RNG) and applied with
    ``F.affine_grid`` + ``F.grid_sample`` (bilinear, zeros outside the image,
    ``align_corners=False``); rotation is done in pixel space, so non-square images are not
    sheared. Zero ranges (``degrees=0, translate=0, scale=(1, 1)``) give the input back
    (up to float rounding, < 1e-6). Returns a new tensor; ``x`` is not modified.

    Args:
        x: floating-point batch ``[N, C, H, W]``.
        degrees: maximal rotation in degrees, in [0, 180].
        translate: maximal shift as a fraction of the image size, in [0, 1].
        scale: ``(low, high)`` zoom range, ``0 < low <= high``.
        generator: CPU ``torch.Generator`` the parameters are drawn from.

    Example::

        >>> x = torch.rand(4, 1, 8, 8)
        >>> y = random_affine(x, degrees=15.0, translate=0.1, generator=torch.Generator().manual_seed(0))
        >>> y.shape, torch.equal(y, random_affine(x, 15.0, 0.1, generator=torch.Generator().manual_seed(0)))
        (torch.Size([4, 1, 8, 8]), True)
        >>> torch.allclose(random_affine(x, 0.0, 0.0, (1.0, 1.0)), x, atol=1e-6)
        True
    """
    _check_batch(x)
    degrees, translate, (lo, hi) = _check_affine_args(degrees, translate, scale)
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(degrees)
    zoom = lo + torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo)
    shift = (torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * translate
    theta = _affine_theta(angle, zoom, shift, h, w).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mixup(x: Tensor, lam: float, perm: Tensor) -> Tensor:
    """Mixup (Zhang et al. 2018) of a batch with a permutation of itself: ``lam * x + (1 - lam) * x[perm]``.

    Args:
        x: floating-point batch ``[N, ...]``.
        lam: mixing weight of the sample itself, in [0, 1].
        perm: long tensor ``[N]``: sample ``i`` is mixed with sample ``perm[i]``.

    Example::

        >>> x = torch.tensor([[0.0], [1.0]])
        >>> mixup(x, 0.75, torch.tensor([1, 0])).flatten().tolist()
        [0.25, 0.75]
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"`x` must be a floating-point tensor [N, ...], got {type(x).__name__}.")
    if not _is_real(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"`lam` must be a number in [0, 1] (the weight of each sample itself), got {lam!r}.")
    _check_perm(perm, x.shape[0])
    return x * lam + x[perm.to(x.device)] * (1.0 - lam)


def cutmix_box(lam: float, height: int, width: int, generator: Optional[torch.Generator] = None) -> tuple[int, int, int, int]:
    """The CutMix box ``(y1, y2, x1, x2)`` of Yun et al. 2019 for a target weight ``lam``.

    The box has sides ``sqrt(1 - lam)`` times the image's, a uniformly random centre, and is
    clipped at the image border (so its area can be smaller than ``1 - lam``).
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (1,), generator=generator).item())
    cx = int(torch.randint(width, (1,), generator=generator).item())
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y1, y2, x1, x2


def cutmix(x: Tensor, lam: float, perm: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, float]:
    """CutMix (Yun et al. 2019): paste one random box of ``x[perm]`` into every sample of ``x``.

    The box (the same for the whole batch, as in the reference code) has sides
    ``sqrt(1 - lam)`` of the image's and a centre drawn from ``generator``; it is clipped at the
    border, so the returned *effective* ``lam = 1 - box area / image area`` -- the share of each
    image that is still its own -- can be larger than the requested one.

    Args:
        x: floating-point batch ``[N, C, H, W]``.
        lam: requested weight of the sample itself, in [0, 1].
        perm: long tensor ``[N]``: sample ``i`` receives the box of sample ``perm[i]``.
        generator: CPU ``torch.Generator`` for the box position (``None``: global RNG).

    Returns:
        ``(mixed, effective_lam)``; ``x`` is not modified.

    Example::

        >>> x = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
        >>> mixed, lam = cutmix(x, 0.75, torch.tensor([1, 0]), torch.Generator().manual_seed(0))
        >>> lam == 1.0 - mixed[0].sum().item() / 16
        True
    """
    _check_batch(x)
    if not _is_real(lam) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"`lam` must be a number in [0, 1] (the weight of each sample itself), got {lam!r}.")
    _check_perm(perm, x.shape[0])
    h, w = x.shape[-2:]
    y1, y2, x1, x2 = cutmix_box(float(lam), h, w, generator)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm.to(x.device)][:, :, y1:y2, x1:x2]
    return mixed, 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)


class FunctionMatching(nn.Module):
    """Consistent, patient augmentation of a whole batch (Beyer et al. 2022, "function matching").

    Call it once on the batch and give the *returned* tensor to both teacher and student, so that
    both see exactly the same augmented input. Every call draws one augmentation for the batch:

    1. per-sample random affine jitter (:func:`random_affine`: rotation in
       ``[-degrees, degrees]``, shift up to ``translate`` of the image size, zoom in ``scale``);
    2. with probability ``mix_prob``, a mix of the batch with a random permutation of itself:
       mixup when only ``mixup_alpha > 0``, CutMix when only ``cutmix_alpha > 0``, and one of
       the two with probability 1/2 per batch when both are (as timm's ``Mixup``). The weight
       ``lam ~ Beta(alpha, alpha)`` is drawn once per batch (all samples share it).

    **Labels.** A mixed sample has no correct single hard label, so ``target_out`` marks every
    sample that was actually mixed with another one (``perm[i] != i`` and ``lam < 1``) with
    ``ignore_index``: the hard-label term averages over labelled samples only, so mixed samples
    are trained by the distillation term alone -- as in Beyer et al., whose loss is pure KD.
    Unmixed samples keep their label. With ``mixup_alpha = cutmix_alpha = 0`` (or
    ``mix_prob = 0``) nothing is mixed and every label is kept.

    **Randomness.** The module owns a CPU ``torch.Generator`` seeded with ``seed`` (or, when
    ``None``, with ``torch.initial_seed()`` -- the ``seed_everything`` seed -- at the first call);
    its state is saved in the module's ``state_dict`` (``_extra_state``), so a resumed run draws
    the same augmentations as an uninterrupted one. Every DDP rank uses the same sequence of
    parameters on its own samples.

    Like dropout, it only augments in training mode: in ``eval()`` mode the inputs and targets
    are returned unchanged (``info["mode"] == "none"``).

    Args:
        degrees: maximal rotation in degrees, in [0, 180].
        translate: maximal shift as a fraction of the image size, in [0, 1].
        scale: ``(low, high)`` zoom range, ``0 < low <= high``.
        mixup_alpha: Beta parameter of mixup, 0 turns mixup off.
        cutmix_alpha: Beta parameter of CutMix, 0 turns CutMix off.
        mix_prob: probability that a batch is mixed at all, in [0, 1].
        seed: seed of the module's generator; ``None`` takes ``torch.initial_seed()``.

    Example::

        >>> fm = FunctionMatching(mixup_alpha=1.0, seed=0)
        >>> x, y = torch.rand(8, 1, 8, 8), torch.arange(8)
        >>> x_aug, y_out, info = fm(x, y)
        >>> x_aug.shape, info["mode"], bool(((y_out == -100) == info["mixed"]).all())
        (torch.Size([8, 1, 8, 8]), 'mixup', True)
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.degrees, self.translate, self.scale = _check_affine_args(degrees, translate, scale)
        self.mixup_alpha = _check_alpha("mixup_alpha", mixup_alpha)
        self.cutmix_alpha = _check_alpha("cutmix_alpha", cutmix_alpha)
        if not _is_real(mix_prob) or not 0.0 <= mix_prob <= 1.0:
            raise ValueError(
                f"`mix_prob` must be a number in [0, 1] (the probability that a batch is mixed), got {mix_prob!r}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an int or None (None = torch.initial_seed()), got {seed!r}.")
        self.mix_prob = float(mix_prob)
        self.seed = seed
        self._generator: Optional[torch.Generator] = None

    def extra_repr(self) -> str:
        return (
            f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, mix_prob={self.mix_prob}, seed={self.seed}"
        )

    @property
    def generator(self) -> torch.Generator:
        """The module's CPU generator (created, and seeded, on first use)."""
        if self._generator is None:
            seed = self.seed if self.seed is not None else torch.initial_seed()
            self._generator = torch.Generator().manual_seed(int(seed) % (2**63))
        return self._generator

    def get_extra_state(self) -> dict[str, Any]:
        state = None if self._generator is None else self._generator.get_state()
        return {"generator_state": state}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("generator_state") is None:
            self._generator = None
            return
        self._generator = torch.Generator()
        self._generator.set_state(state["generator_state"].cpu())

    def _choose_mode(self, g: torch.Generator) -> str:
        if self.mixup_alpha == 0.0 and self.cutmix_alpha == 0.0:
            return "none"
        if self.mix_prob < 1.0 and torch.rand((), generator=g).item() >= self.mix_prob:
            return "none"
        if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
            return "cutmix" if torch.rand((), generator=g).item() < 0.5 else "mixup"
        return "mixup" if self.mixup_alpha > 0.0 else "cutmix"

    def forward(
        self, inputs: Tensor, target: Optional[Tensor] = None, ignore_index: int = -100
    ) -> tuple[Tensor, Optional[Tensor], dict[str, Any]]:
        """Augment ``inputs`` (``[N, C, H, W]``) once; see the class docstring.

        Returns:
            ``(inputs_aug, target_out, info)``: the augmented batch (a new tensor), the targets
            with every mixed sample set to ``ignore_index`` (``None`` if ``target`` is ``None``),
            and ``info = {"lam": float, "mode": "mixup" | "cutmix" | "none", "perm": LongTensor[N],
            "mixed": BoolTensor[N]}`` -- ``lam`` is the effective weight of each sample itself
            (1.0 when nothing was mixed).
        """
        _check_batch(inputs, "inputs")
        n = inputs.shape[0]
        if target is not None and (not isinstance(target, Tensor) or target.dim() == 0 or target.shape[0] != n):
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"`target` must be None or a tensor whose first dimension is the batch size {n}, got {got}.")
        identity = torch.arange(n, device=inputs.device)
        if not self.training:
            return inputs, target, {"lam": 1.0, "mode": "none", "perm": identity, "mixed": identity < 0}
        g = self.generator
        out = random_affine(inputs, self.degrees, self.translate, self.scale, generator=g)
        mode, lam, perm = self._choose_mode(g), 1.0, identity
        if mode != "none":
            alpha = self.mixup_alpha if mode == "mixup" else self.cutmix_alpha
            lam = sample_beta(alpha, g)
            perm = torch.randperm(n, generator=g).to(inputs.device)
            if mode == "mixup":
                out = mixup(out, lam, perm)
            else:
                out, lam = cutmix(out, lam, perm, g)
        mixed = (perm != identity) & (lam < 1.0)
        target_out = target
        if target is not None:
            target_out = target.clone()
            target_out[mixed.to(target.device)] = ignore_index
        return out, target_out, {"lam": float(lam), "mode": mode, "perm": perm, "mixed": mixed}


class AugmentedDataset(Dataset):
    """A fixed, augmented, unlabeled transfer set built from the inputs of ``base``.

    Sample ``i`` (of ``copies * len(base)``) is copy ``k = i // len(base)`` of base sample
    ``j = i % len(base)`` with its own random affine jitter (:func:`random_affine`) and, when
    ``mixup_alpha > 0``, mixed with another (jittered) base sample with a weight
    ``lam ~ Beta(mixup_alpha, mixup_alpha)``. All of it is drawn from a generator seeded with
    ``(seed, i)``: sample ``i`` is the same tensor every time it is read, so a teacher-output
    cache keyed on the index stays valid across epochs, and ``copies`` versions of each image
    differ from one another. Samples are ``(input, ignore_index, index)``: they carry no label
    (their teacher's output is the only target).

    The base must be deterministic for the set to be fixed: use a base without random
    transforms (e.g. the digits training set, not CIFAR's randomly cropped one).

    Args:
        base: map-style dataset whose samples have a tensor input ``[C, H, W]`` (or ``[H, W]``)
            at element 0 (labelled ``(input, target[, index])`` samples are fine).
        copies: augmented versions of each base sample.
        degrees: maximal rotation in degrees, in [0, 180].
        translate: maximal shift as a fraction of the image size, in [0, 1].
        scale: ``(low, high)`` zoom range.
        mixup_alpha: Beta parameter of the mix with a second base sample; 0 = no mixing.
        seed: seed of the whole set.
        ignore_index: the target every sample carries.

    Example::

        >>> base = [(torch.rand(1, 8, 8), 3)] * 10
        >>> ds = AugmentedDataset(base, copies=3, seed=0)
        >>> x, y, index = ds[12]
        >>> len(ds), tuple(x.shape), int(y), index, ds.base_index(12), torch.equal(x, ds[12][0])
        (30, (1, 8, 8), -100, 12, 2, True)
    """

    def __init__(
        self,
        base: Dataset,
        copies: int = 5,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        mixup_alpha: float = 0.0,
        seed: int = 0,
        ignore_index: int = -100,
    ) -> None:
        if not isinstance(base, Sized) or not hasattr(base, "__getitem__"):
            raise TypeError(
                f"`base` must be a map-style dataset (with __len__ and __getitem__), got {type(base).__name__}."
            )
        if len(base) == 0:
            raise ValueError("`base` is empty: an augmented transfer set needs at least one base sample.")
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise ValueError(f"`copies` must be an integer >= 1 (augmented versions of each base sample), got {copies!r}.")
        self.degrees, self.translate, self.scale = _check_affine_args(degrees, translate, scale)
        self.mixup_alpha = _check_alpha("mixup_alpha", mixup_alpha)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        self.base = base
        self.copies = copies
        self.seed = seed
        self.ignore_index = int(ignore_index)
        self._input(0)  # fail early on a base without tensor inputs

    def __len__(self) -> int:
        return self.copies * len(self.base)

    def base_index(self, index: int) -> int:
        """The base sample that sample ``index`` is an augmented copy of."""
        return index % len(self.base)

    def _input(self, j: int) -> Tensor:
        sample = self.base[j]
        x = sample[0] if isinstance(sample, (tuple, list)) else sample
        if not isinstance(x, Tensor) or x.dim() not in (2, 3) or not x.is_floating_point():
            what = f"a {x.dim()}-D {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(
                f"AugmentedDataset needs base samples with a floating-point image tensor [C, H, W] or [H, W] at "
                f"element 0, got {what} (sample {j}); give the base dataset a transform that returns tensors "
                f"(e.g. torchvision.transforms.ToTensor())."
            )
        return x

    def _jitter(self, x: Tensor, g: torch.Generator) -> Tensor:
        batch = x.reshape(1, -1, *x.shape[-2:])
        return random_affine(batch, self.degrees, self.translate, self.scale, generator=g).reshape(x.shape)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for an AugmentedDataset of {len(self)} samples.")
        index %= len(self)
        g = torch.Generator().manual_seed(_derive_seed(self.seed, index))
        x = self._jitter(self._input(self.base_index(index)), g)
        if self.mixup_alpha > 0.0:
            partner = int(torch.randint(len(self.base), (1,), generator=g).item())
            lam = sample_beta(self.mixup_alpha, g)
            x = x * lam + self._jitter(self._input(partner), g) * (1.0 - lam)
        return x, torch.tensor(self.ignore_index, dtype=torch.long), index

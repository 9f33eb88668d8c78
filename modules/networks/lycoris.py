"""LyCORIS layers (LoHa, LoKr, full diffs, LoCon with a CP core): their deltas, with A1111's and
LyCORIS' formulas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class LycoModule:
    """A LyCORIS layer (LoHa, LoKr or a full `diff`) that has no plain up @ down form: its delta is built
    whole, with A1111's (and LyCORIS') formulas and scale alpha / rank (1 without alpha or rank)."""
    kind: str  # "loha" | "lokr" | "full" | "locon_cp" (a LoRA with a CP-decomposed `lora_mid`)
    tensors: dict[str, Any]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "locon_cp":
            return t["down"].shape[0]
        if self.kind == "lokr":
            for key in ("lokr_w2_b", "lokr_w1_b"):  # A1111's order
                if key in t:
                    return t[key].shape[0]
        return None

    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def _factor(self, prefix: str, tucker: str | None, cp_out: bool):
        """w = a @ b (or a CP/Tucker rebuild with `tucker`), or the stored full matrix `prefix`."""
        import torch
        t = self.tensors
        if prefix in t:
            return t[prefix]
        a, b = t[prefix + "_a"], t[prefix + "_b"]
        if tucker and tucker in t:
            # [r, r, k, k] core with [r, out] and [r, in] factors -> [out, in, k, k]
            return torch.einsum("i j k l, j r, i p -> p r k l", t[tucker], b, a)
        if cp_out:
            shape = [a.shape[0], b.shape[1], *b.shape[2:]]
            return (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape(shape)
        return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)

    def delta(self, weight_shape) -> Any:
        import torch
        t = self.tensors
        if self.kind == "full":
            delta = t["diff"]
        elif self.kind == "locon_cp":
            delta = torch.einsum("n m k l, i n, m j -> i j k l", t["mid"], t["up"].flatten(1), t["down"].flatten(1))
        elif self.kind == "loha":
            delta = self._factor("hada_w1", "hada_t1", True) * self._factor("hada_w2", "hada_t2", True)
        else:
            w1 = self._factor("lokr_w1", None, False)
            w2 = self._factor("lokr_w2", "lokr_t2", True)
            if w2.ndim == 4:
                w1 = w1.reshape(*w1.shape, 1, 1)
            delta = torch.kron(w1.contiguous(), w2.contiguous())  # a Tucker rebuild is a non-contiguous view
        return (delta * self.scale()).reshape(weight_shape)

    def out_features_and_numel(self) -> tuple[int, int]:
        """(rows, elements) of the delta, without building it."""
        t = self.tensors
        shape = self._shape

        def numel(dims):
            n = 1
            for d in dims:
                n *= d
            return n
        if self.kind == "full":
            return t["diff"].shape[0], t["diff"].numel()
        if self.kind == "locon_cp":
            return t["up"].shape[0], numel([t["up"].shape[0], t["down"].shape[1], *t["mid"].shape[2:]])
        if self.kind == "loha":
            dims = shape("hada_w1", "hada_t1")
            return dims[0], numel(dims)
        w1, w2 = shape("lokr_w1", None), shape("lokr_w2", "lokr_t2")
        return w1[0] * w2[0], numel(w1) * numel(w2)

    def consistent(self) -> bool:
        """Whether the factors' shapes chain (a malformed file must be skipped, not fail in a matmul)."""
        t = self.tensors

        def pair(prefix, tucker, full_ndims=(2, 4)):
            if prefix in t:
                return t[prefix].ndim in full_ndims
            a, b = t[prefix + "_a"], t[prefix + "_b"]
            if tucker and tucker in t:  # [r, out] and [r, in] around a [r, r, k, k] core
                core = t[tucker]
                return (a.ndim == 2 and b.ndim == 2 and core.ndim == 4 and core.shape[0] == a.shape[0]
                        and core.shape[1] == b.shape[0])
            return a.ndim == 2 and b.ndim in (2, 4) and a.shape[1] == b.shape[0]

        if self.kind == "full":
            return True
        if self.kind == "locon_cp":
            up, mid, down = t["up"], t["mid"], t["down"]
            return (up.ndim in (2, 4) and down.ndim in (2, 4) and mid.ndim == 4
                    and up.flatten(1).shape[1] == mid.shape[0] and down.flatten(1).shape[0] == mid.shape[1])
        if self.kind == "loha":
            return (pair("hada_w1", "hada_t1") and pair("hada_w2", "hada_t2")
                    and self._shape("hada_w1", "hada_t1") == self._shape("hada_w2", "hada_t2"))
        return pair("lokr_w1", None, full_ndims=(2,)) and pair("lokr_w2", "lokr_t2")

    def _shape(self, prefix, tucker) -> list[int]:
        t = self.tensors
        if prefix in t:
            return list(t[prefix].shape)
        a, b = t[prefix + "_a"], t[prefix + "_b"]
        if tucker and tucker in t:
            return [a.shape[1], b.shape[1], *t[tucker].shape[2:]]
        return [a.shape[0], *b.shape[1:]]

    def fits(self, weight_shape) -> bool:
        total = 1
        for d in weight_shape:
            total *= d
        return self.consistent() and self.out_features_and_numel() == (weight_shape[0], total)

    def tensors_list(self) -> list:
        return list(self.tensors.values())

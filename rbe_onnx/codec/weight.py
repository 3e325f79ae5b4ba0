"""The encoded form of one weight matrix, as an RBEFusedGemm node carries it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .outliers import positions
from .rotation import Rotation
from .seed import check_layout, check_seeds, FormatError


@dataclass(frozen=True)
class RBEWeight:
    """Seeds + packed codes of a K x N weight (docs/FORMAT.md)."""

    K: int
    N: int
    bits: int
    block_size: int
    scale0: float
    seeds: np.ndarray  # int64 [N, nb]
    codes: np.ndarray  # uint8 [N · nb · block_size · bits / 8]
    center: np.ndarray | None = None  # float32 [K] (§5.1), scaled per block by the seeds' alpha
    outliers: np.ndarray | None = None  # uint8 [3 · Σ counts] (§5.2): per outlier its row and binary16 value
    rotation: int = 0         # §5.3: R of the input rotation Q (0: none); the codes then store Qᵀ·W
    rotation_seed: int = 0    # §5.3: the 64-bit seed of Q's signs

    @property
    def blocks_per_column(self) -> int:
        return -(-self.K // self.block_size)

    @property
    def block_bytes(self) -> int:
        return self.block_size * self.bits // 8

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes + seeds + the float scale0 (+ the center vector, + the outlier records, + the two
        int64 rotation attributes)."""
        return int(self.codes.nbytes + self.seeds.nbytes + 4 + (0 if self.center is None else 4 * self.K)
                   + (0 if self.outliers is None else self.outliers.nbytes) + (16 if self.rotation else 0))

    @property
    def input_rotation(self) -> Rotation | None:
        return Rotation(self.rotation, self.rotation_seed) if self.rotation else None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.K * self.N)

    def validate(self) -> dict[str, np.ndarray]:
        """Raises FormatError naming the first rule of FORMAT.md §6 this weight breaks; returns the seed fields."""
        check_layout(self.K, self.N, self.bits, self.block_size, self.scale0)
        if self.rotation:
            try:
                self.input_rotation.check(self.K)
            except ValueError as e:
                raise FormatError(str(e)) from None
        if self.center is not None:
            c = self.center
            if c.dtype != np.float32 or c.shape != (self.K,):
                raise FormatError(f"center must be float32 of shape [{self.K}], got {c.dtype} {list(c.shape)}")
            if not np.all(np.isfinite(c)):
                raise FormatError("center holds NaN or Inf")
        fields = check_seeds(self.seeds, self.K, self.N, self.bits, self.block_size,
                             has_center=self.center is not None, has_outliers=self.outliers is not None,
                             rotated=bool(self.rotation))
        expected = self.N * self.blocks_per_column * self.block_bytes
        if self.codes.dtype != np.uint8 or self.codes.ndim != 1 or self.codes.size != expected:
            raise FormatError(f"codes must be uint8 1-D of {expected} bytes, got {self.codes.dtype} "
                              f"{list(self.codes.shape)}")
        if self.outliers is not None:
            positions(fields["outliers"], self.outliers, self.K, self.block_size)
        return fields

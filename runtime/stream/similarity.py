"""StreamDiffusion's stochastic similarity filter (Kim et al. 2023, Sec. 3.4): a frame is skipped with probability
max(0, 1 - (1 - cos) / (1 - threshold)), cos its cosine similarity to the last processed frame (pixels in [-1, 1]),
so a static scene costs nothing and a slowly changing one is sampled less often; at most max_skipped in a row."""

import random

from torch import Tensor


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """0-d cosine similarity of two uint8 [H, W, 3] frames taken to [-1, 1] (the pipeline's VAE input range)."""
    x, y = a.float().flatten() / 127.5 - 1, b.float().flatten() / 127.5 - 1
    return (x @ y) / (x.norm() * y.norm()).clamp_min(1e-6)


class SimilarityFilter:
    def __init__(self, threshold: float, max_skipped: int, seed: int) -> None:
        self.threshold, self.max_skipped = threshold, max_skipped
        self._random = random.Random(seed)  # per stream: two sessions never share a draw sequence
        self.skipped_in_a_row = 0

    def skip(self, similarity: float) -> bool:
        """Whether to skip a frame this similar to the last processed one (host decision, once per frame)."""
        if self.threshold >= 1.0 or self.skipped_in_a_row >= self.max_skipped:
            self.skipped_in_a_row = 0
            return False
        probability = max(0.0, 1.0 - (1.0 - similarity) / (1.0 - self.threshold))
        if self._random.random() < probability:
            self.skipped_in_a_row += 1
            return True
        self.skipped_in_a_row = 0
        return False

"""The reward model of the diffusion-alignment benchmark (issue #34): a small CNN classifier of
28×28 grey images in [−1, 1]; the reward of an image for condition c is its softmax
probability of class c (:func:`reward`). Ours: the paper's rewards are human-preference
scorers on text-to-image samples.
"""

from __future__ import annotations

from torch import Tensor, nn

from splice.domains.backbones.ddpm import check_classes

__all__ = ["RewardClassifier", "reward"]


class RewardClassifier(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.classes = classes
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 64),
            nn.GELU(),
            nn.Linear(64, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Class logits of (B, 28, 28) images."""
        return self.net(x.unsqueeze(1))


def reward(model: RewardClassifier, x: Tensor, c: Tensor) -> Tensor:
    """(B,) probability the classifier gives class ``c`` of each image (differentiable)."""
    check_classes(c, model.classes)
    return model(x).softmax(-1).gather(1, c[:, None]).squeeze(1)

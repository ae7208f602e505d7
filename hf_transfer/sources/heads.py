"""Classification heads on pooled backbone features: linear, MLP, and a bottleneck adapter.

A head maps (batch, in_features) -> (batch, num_classes). Sources put it where their library's own
classifier was, so the library's forward (pooling, pre-logits) stays untouched; see sources/vision.py.
"""

from __future__ import annotations

from torch import nn

from hf_transfer.recipe import HeadConfig


class MLPHead(nn.Sequential):
    """dropout -> linear -> GELU -> dropout -> linear.

    Not timm's `Mlp` (linear -> act -> dropout -> norm -> linear -> dropout): its order differs (no dropout
    on the input features) and its parameter names too, which would break heads already saved.
    """

    def __init__(self, in_features: int, num_classes: int, hidden_dim: int, dropout: float):
        super().__init__(
            nn.Dropout(dropout),
            nn.Linear(in_features, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )


class BottleneckAdapterHead(nn.Module):
    """A residual bottleneck adapter (Houlsby et al., 2019) on the features, then a linear classifier.

    The up-projection starts at zero, so at initialisation the head is exactly a linear probe and
    the adapter only adds what helps. LayerNorm, not BatchNorm: it works with a batch of one.
    """

    def __init__(self, in_features: int, num_classes: int, bottleneck_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.down = nn.Linear(in_features, bottleneck_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck_dim, in_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, num_classes)

    def forward(self, features):
        adapted = features + self.up(self.act(self.down(self.norm(features))))
        return self.classifier(self.dropout(adapted))


def zero_init_output(head: nn.Module) -> nn.Module:
    """Zero the head's last linear layer, so training starts from uniform predictions (loss ln k).

    Libraries initialise classifiers for 1000 classes; timm's EfficientNet init, for one, draws
    weights from U(-1/sqrt(k), 1/sqrt(k)), which for k=2 gives logits in the tens on pretrained
    features and costs the first epochs undoing them. BiT fine-tunes from a zero head too.
    """
    layers = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]  # a few timm heads are 1x1 convs
    if layers:
        nn.init.zeros_(layers[-1].weight)
        if layers[-1].bias is not None:
            nn.init.zeros_(layers[-1].bias)
    return head


def build_head(config: HeadConfig, in_features: int, num_classes: int) -> nn.Module:
    """The head the recipe asks for (`linear` is a plain nn.Linear, dropout left to the source)."""
    if config.type == "mlp":
        return MLPHead(in_features, num_classes, config.hidden_dim, config.dropout)
    if config.type == "bottleneck":
        return BottleneckAdapterHead(in_features, num_classes, config.hidden_dim, config.dropout)
    return nn.Linear(in_features, num_classes)

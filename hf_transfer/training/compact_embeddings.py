"""Train only the rows of a text model's token-embedding matrix that the training texts use.

MiniLM-L6's word embeddings (30,522 x 384) are half its parameters. Updated whole, every step
builds a gradient for every row, clips it and runs AdamW over it, although the training split of
a small data set uses a few thousand rows. A row no training text uses has a zero gradient at
every step, so AdamW's moments stay zero and all the optimiser does to it is the decoupled weight
decay, p <- p (1 - lr x wd): one factor, the same for every such row. So the matrix trains as its
used rows plus one row of ones that no input selects, which receives exactly that factor; when
training ends, each unused row is its pretrained value times that row. The model is the dense
update's up to float rounding (tests/test_compact_embeddings.py); on a CPU a step on SST-2 is up to
1.2x shorter and takes less memory (benchmarks/BENCHMARKS.md, issue 14). Checkpoints hold the
compact weight and its token ids; a resumed run rebuilds the same rows from the same data.

This holds for every optimiser whose update of a parameter without gradient is linear in it: AdamW,
SGD (its weight decay and momentum are linear), and Adam without weight decay. Adam's weight decay
enters its adaptive moments, which are not linear: such a run updates the whole matrix.

Not torch's sparse embedding gradients: AdamW refuses them, and SparseAdam leaves rows absent from
a batch without their decay and momentum (a different model).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from hf_transfer.errors import HfTransferError
from hf_transfer.sources.base import TransferModel
from hf_transfer.training.plan import Callback


class CompactEmbedding(nn.Module):
    """A token embedding whose trainable `weight` holds the rows of `token_ids` and, last, the factor every other
    row has been scaled by; any token id still embeds as the whole matrix would (unused rows from the pretrained
    values times that factor).

    The pretrained matrix and the id -> row map are plain attributes, not buffers: checkpoints and weight
    averages need only `weight`, and distributed training would broadcast buffers every step. The ids are a
    (small) buffer, so that a checkpoint records which rows it holds and a resume onto other rows is refused.
    """

    def __init__(self, original: nn.Embedding, token_ids: torch.Tensor):
        super().__init__()
        device = original.weight.device
        token_ids = token_ids.to(device)
        self.pretrained = original.weight.detach()
        self.register_buffer("token_ids", token_ids)
        self.unused_row = len(token_ids)  # the row of ones that carries the unused rows' factor
        self.row_of_token = torch.full((original.num_embeddings,), self.unused_row, dtype=torch.long, device=device)
        self.row_of_token[token_ids] = torch.arange(len(token_ids), device=device)
        factor = torch.ones(1, original.embedding_dim, dtype=original.weight.dtype, device=device)
        self.weight = nn.Parameter(torch.cat([self.pretrained[token_ids], factor]))
        padding = original.padding_idx
        # the padding row gets no gradient, as in the original; a padding id outside token_ids reads the untrained
        # path, pretrained x factor, which is what a row without gradient gets anyway
        self.padding_row = int(self.row_of_token[padding]) if padding is not None else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.row_of_token[input_ids]
        trained = functional.embedding(rows, self.weight, self.padding_row)
        # ids the training texts never use (evaluation texts may): their pretrained vector times the factor,
        # detached so that no input ever gives the factor's row a gradient
        untrained = functional.embedding(input_ids, self.pretrained) * self.weight[self.unused_row].detach()
        return torch.where((rows == self.unused_row).unsqueeze(-1), untrained, trained)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        saved = state_dict.get(f"{prefix}token_ids")
        if saved is not None and not torch.equal(saved.to(self.token_ids.device), self.token_ids):
            raise HfTransferError(
                "The saved weights hold the word-embedding rows of other token ids than this run's training texts use: "
                "the training data changed since they were saved. Resume with the data the run started with, or start "
                "a new run."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def write_into(self, original: nn.Embedding) -> None:
        """The whole matrix, as the dense update would have left it, into `original`'s weight (in place: no second
        matrix, since this also runs after a failure, an out-of-memory one included)."""
        original.weight.mul_(self.weight[self.unused_row])  # `pretrained` is this storage: not read again
        original.weight[self.token_ids] = self.weight[: self.unused_row]


def compacts(embeddings: nn.Module | None, model: nn.Module, optimizer: str, weight_decay: float) -> bool:
    """Whether the word embeddings train and can train compact here (see the module's docstring)."""
    # exactly nn.Embedding: a subclass may change the lookup (Gemma's and BioGPT's scale it), which the swap would drop
    if type(embeddings) is not nn.Embedding or not embeddings.weight.requires_grad:
        return False
    if embeddings.max_norm is not None or embeddings.scale_grad_by_freq or embeddings.sparse:
        return False  # these change the rows a lookup touches or how their gradient is formed
    # tied to an output layer (the same Parameter twice), which would go on reading the matrix swapped out
    tied = sum(p is embeddings.weight for _, p in model.named_parameters(remove_duplicate=False)) > 1
    return not tied and (optimizer in ("adamw", "sgd") or weight_decay == 0)


class CompactWordEmbeddings(Callback):
    """Swaps a text model's word embeddings for a `CompactEmbedding` of `token_ids` before the optimiser is built,
    and writes the whole matrix back when training ends (training.compact_embeddings). Does nothing where the
    embeddings do not train, or cannot train compact (`compacts`)."""

    def __init__(self, token_ids: torch.Tensor, optimizer: str, weight_decay: float):
        self.token_ids = token_ids
        self.optimizer, self.weight_decay = optimizer, weight_decay
        self.original: nn.Embedding | None = None
        self.compact: CompactEmbedding | None = None
        self.rows_trained: int | None = None  # for metrics.json; None: the whole matrix trained, or none of it

    def on_train_setup(self, model: TransferModel) -> None:
        embeddings = model.word_embeddings()
        if not compacts(embeddings, model, self.optimizer, self.weight_decay):
            return
        self.original = embeddings
        self.compact = CompactEmbedding(embeddings, self.token_ids)
        self.rows_trained = len(self.token_ids)
        model.set_word_embeddings(self.compact)

    def on_train_end(self, model: TransferModel) -> None:
        if self.compact is None:
            return
        self.compact.write_into(self.original)
        model.set_word_embeddings(self.original)
        self.original = self.compact = None


def train_rows_of_both(callbacks: list[Callback], others: list[Callback]) -> None:
    """Widens, in place, the CompactWordEmbeddings among `callbacks` to the token ids of those among `others`: a run
    that also feeds another data set's texts through the trained embeddings (domain adaptation's target, with the
    backbone in the loop) must train their rows too, or it would not be the whole matrix's model."""
    for callback in (c for c in callbacks if isinstance(c, CompactWordEmbeddings)):
        for other in (c for c in others if isinstance(c, CompactWordEmbeddings)):
            callback.token_ids = torch.cat([callback.token_ids, other.token_ids]).unique()

"""Word embeddings trained as the rows the training texts use (training.compact_embeddings): the same model as
the whole matrix, on a tiny BERT."""

from __future__ import annotations

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, WORDS, keyword_sentences, write_jsonl
from test_text import train

from hf_transfer.training.compact_embeddings import CompactEmbedding, compacts


# the weights each epoch is scored and saved with: the live ones, an average, a mix with the start (all linear)
@pytest.mark.parametrize("evaluated", [{}, {"ema_decay": 0.9}, {"weight_interpolation": 0.5}])
def test_compact_embeddings_train_the_same_model_as_the_whole_matrix(tiny_bert_dir, tmp_path, evaluated):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "data"
    training_words = WORDS[:8]
    write_jsonl(data / "train.jsonl", keyword_sentences(96, seed=1, vocabulary=training_words))
    write_jsonl(data / "validation.jsonl", keyword_sentences(40, seed=2))  # with words no training text uses
    runs = {}
    for compact in (True, False):
        out = tmp_path / f"compact_{compact}"
        summary = train(tiny_bert_dir, data, out, training={"epochs": 2, "weight_decay": 0.5, "compact_embeddings": compact,
                                                            "weight_interpolation": None, **evaluated})
        weight = AutoModelForSequenceClassification.from_pretrained(out).bert.embeddings.word_embeddings.weight.detach()
        runs[compact] = summary, weight
    (compact_summary, compact), (whole_summary, whole) = runs[True], runs[False]

    torch.testing.assert_close(compact, whole, rtol=1e-5, atol=1e-6)
    assert [e["accuracy"] for e in compact_summary["history"]] == [e["accuracy"] for e in whole_summary["history"]]
    assert compact_summary["trainable_parameters"] == whole_summary["trainable_parameters"]
    # [PAD], [CLS], [SEP], the eight words and the two keywords
    assert (compact_summary["word_embedding_rows_trained"], whole_summary["word_embedding_rows_trained"]) == (13, None)

    pretrained = AutoModel.from_pretrained(tiny_bert_dir).embeddings.word_embeddings.weight.detach()
    vocabulary = AutoTokenizer.from_pretrained(tiny_bert_dir).get_vocab()
    unused = [vocabulary[word] for word in WORDS[8:]]
    used = [vocabulary[word] for word in [*training_words, POSITIVE, NEGATIVE]]
    # a row no training text uses was only decayed: one factor below 1 for all of them
    factors = compact[unused] / pretrained[unused]
    assert float(factors.max()) < 1.0
    torch.testing.assert_close(factors, torch.full_like(factors, float(factors[0, 0])), rtol=1e-5, atol=0)
    # the used rows trained: no longer a multiple of their pretrained values
    assert not torch.allclose(compact[used] / pretrained[used], factors[0, 0].expand(len(used), pretrained.shape[1]),
                              rtol=1e-3)


def test_a_compact_embedding_embeds_every_id_as_the_matrix_and_writes_it_back_unchanged():
    original = torch.nn.Embedding(20, 6, padding_idx=0)
    kept = original.weight.detach().clone()
    compact = CompactEmbedding(original, torch.tensor([0, 3, 4, 11]))
    assert compact.weight.shape == (5, 6) and compact.padding_row == 0
    every_id = torch.arange(20).reshape(4, 5)
    torch.testing.assert_close(compact(every_id), original(every_id), rtol=0, atol=0)

    compact(torch.tensor([[3, 4, 0, 7]])).sum().backward()
    assert compact.weight.grad[1:3].abs().sum() > 0  # ids 3 and 4
    assert compact.weight.grad[0].abs().sum() == 0  # padding
    assert compact.weight.grad[4].abs().sum() == 0  # the factor's row: id 7 is not trained

    compact.write_into(original)
    assert torch.equal(original.weight.detach(), kept)


class ScaledEmbedding(torch.nn.Embedding):
    """A lookup times a constant, as Gemma's and BioGPT's word embeddings are."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * 4.0


@pytest.mark.parametrize(("optimizer", "weight_decay", "frozen", "tied", "kind", "expected"), [
    ("adamw", 0.01, False, False, torch.nn.Embedding, True),
    ("sgd", 0.01, False, False, torch.nn.Embedding, True),
    ("adam", 0.0, False, False, torch.nn.Embedding, True),
    ("adam", 0.01, False, False, torch.nn.Embedding, False),  # Adam's weight decay is not linear in the weight
    ("adamw", 0.01, True, False, torch.nn.Embedding, False),  # nothing to train
    ("adamw", 0.01, False, True, torch.nn.Embedding, False),  # an output layer reads the same matrix
    ("adamw", 0.01, False, False, ScaledEmbedding, False),  # its own lookup, which the swap would drop
])
def test_compact_embeddings_apply_only_where_they_give_the_same_model(optimizer, weight_decay, frozen, tied, kind,
                                                                      expected):
    embeddings = kind(20, 6)
    output = torch.nn.Linear(6, 20, bias=False)
    if tied:
        output.weight = embeddings.weight
    embeddings.weight.requires_grad_(not frozen)
    model = torch.nn.ModuleDict({"embeddings": embeddings, "output": output})
    assert compacts(embeddings, model, optimizer, weight_decay) is expected


def test_adapting_with_the_backbone_in_the_loop_trains_the_targets_rows_too(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file
    from test_adapt_backbone import backbone_recipe
    from test_domain import target_sentences

    from hf_transfer.recipe import recipe_from_dict
    from hf_transfer.run import run_training

    source = write_jsonl(tmp_path / "source.jsonl", keyword_sentences(64, seed=1))
    target = write_jsonl(tmp_path / "target.jsonl", target_sentences(48, seed=2))  # [UNK] for the tiny vocabulary
    weights, rows = {}, {}
    for compact in (True, False):
        recipe = backbone_recipe(tiny_bert_dir, source, target, tmp_path / f"compact_{compact}", method="mcc")
        recipe["training"] |= {"compact_embeddings": compact, "weight_decay": 0.5}
        rows[compact] = run_training(recipe_from_dict(recipe))["word_embedding_rows_trained"]
        saved = load_file(str(tmp_path / f"compact_{compact}" / "model.safetensors"))
        weights[compact] = next(v for n, v in saved.items() if n.endswith("word_embeddings.weight"))
    assert rows == {True: len(WORDS) + 6, False: None}  # the words, both keywords, [PAD] [CLS] [SEP], and [UNK]
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)


def test_resuming_onto_other_training_texts_is_refused(tiny_bert_dir, tmp_path):
    from test_text import text_recipe

    from hf_transfer.errors import HfTransferError
    from hf_transfer.recipe import recipe_from_dict
    from hf_transfer.run import run_training

    data, out = tmp_path / "data", tmp_path / "out"
    rows = keyword_sentences(64, seed=1, vocabulary=WORDS[:8])
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", keyword_sentences(20, seed=2))
    recipe = text_recipe(tiny_bert_dir, data, out, training={"epochs": 2, "save_checkpoints": True})
    run_training(recipe_from_dict(recipe))
    first_epoch = min((out / "checkpoints").iterdir(), key=lambda path: int(path.name.split("-")[1]))
    # as many distinct words as before, one of them another: the rows' shapes still fit
    changed = [{**row, "text": row["text"].replace(WORDS[0], WORDS[10])} for row in rows]
    write_jsonl(data / "train.jsonl", changed)
    with pytest.raises(HfTransferError, match="the training data changed since they were saved"):
        run_training(recipe_from_dict(recipe), resume=str(first_epoch))

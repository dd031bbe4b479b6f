"""Task heads: BIO decoding to character spans, and HF's last-non-pad pooling."""

from __future__ import annotations

import pytest
import torch

from server.heads import bio_entities, last_non_pad_index


def test_bio_decoding_spans_scores_and_broken_sequences():
    text = "Ann Lee visited New York"
    labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    offsets = [(0, 0), (0, 3), (3, 7), (7, 15), (15, 19), (19, 24)]
    tags = [0, 1, 2, 0, 4, 4]  # a stray I-LOC starts a new entity, as HF's "simple" strategy does
    logits = torch.full((6, 5), -10.0)
    logits[torch.arange(6), torch.tensor(tags)] = 10.0
    logits[2, 1] = 9.0  # lowers the top probability of the "Lee" token
    entities = bio_entities(text, logits, offsets, labels)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Ann Lee", 0, 7),
        ("LOC", "New York", 16, 24),
    ]
    top = torch.softmax(logits[2], -1).max().item()
    assert entities[0]["score"] == pytest.approx((torch.softmax(logits[1], -1).max().item() + top) / 2)
    assert top < 0.8


def test_words_take_their_first_sub_token_tag():
    text = "Lena joined Kestrel Systems."
    labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG"]
    # Len|a joined Kest|rel Syst|ems|. : trimmed offsets, as the built-in tokenizer gives them
    offsets = [(0, 3), (3, 4), (5, 11), (12, 16), (16, 19), (20, 24), (24, 27), (27, 28)]
    tags = [1, 3, 0, 3, 1, 4, 0, 2]  # noise on every non-first sub-token must not matter
    logits = torch.full((8, 5), -10.0)
    logits[torch.arange(8), torch.tensor(tags)] = 10.0
    entities = bio_entities(text, logits, offsets, labels)
    assert [(e["type"], e["text"]) for e in entities] == [("PER", "Lena"), ("ORG", "Kestrel Systems.")]


def test_last_non_pad_index_mirrors_hf_pooling():
    assert last_non_pad_index([5, 6, 0, 0], 0) == 1
    assert last_non_pad_index([0, 0], 0) == 0
    assert last_non_pad_index([5, 6], None) == 1

#> L01 embedding
"""
model.py -- a decoder-only transformer, from token ids to next-token logits.

Lesson 01 starts it with the first layer every language model has: the token
embedding, a learned table that turns each id into a vector. Later lessons add
positions, attention, the block, the cache and real weights on top.
"""

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------
# Token embedding


class TokenEmbedding(nn.Embedding):
    """A (vocab_size, n_embd) table of learned vectors; row i represents token i.

    Looking up row i is the same as multiplying a one-hot vector by the table:
    onehot(idx) @ W, shape (B, T, V) @ (V, C) -> (B, T, C). The lookup skips
    the multiplication, and the gradient reaches only the rows that were used,
    so a token's vector learns only from the contexts it appears in.

    >>> emb = TokenEmbedding(10, 4)
    >>> emb(torch.tensor([[1, 2, 3]])).shape  # (B, T) ids -> (B, T, C) vectors
    torch.Size([1, 3, 4])
    """

    def __init__(self, vocab_size, n_embd):
        super().__init__(vocab_size, n_embd)
        # N(0, 0.02): GPT-2's choice; small enough that the first logits are near
        # uniform (loss ~ ln(vocab_size)) and training starts from no preference.
        nn.init.normal_(self.weight, mean=0.0, std=0.02)
#< L01

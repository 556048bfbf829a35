"""Learnable prompts (CoOp/DenseCLIP style): ``[SOT] ctx_1 .. ctx_N name tokens [EOT]`` per class."""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from weakclip_core.models.clip import encode_token_embeddings, text_width


def class_name_token_ids(class_names: list[str], name_length: int) -> tuple[list[list[int]], list[int]]:
    """``[SOT] name [EOT]`` token ids per class, zero-padded to ``name_length``, and each EOT index.

    A name too long for ``name_length`` is a ``ValueError`` that names it (silent truncation would drop the
    end token and mix classes up); the stage adds the params key and prints it as one line.
    """
    tokenizer = SimpleTokenizer()
    start, end = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
    rows: list[list[int]] = []
    end_positions: list[int] = []
    for name in class_names:
        tokens = [start, *tokenizer.encode(name), end]
        if len(tokens) > name_length:
            raise ValueError(f"class name '{name}' needs {len(tokens)} tokens with start/end but the text "
                             f"context length minus the prompt length leaves {name_length}; "
                             f"raise the text context length")
        end_positions.append(len(tokens) - 1)
        rows.append(tokens + [0] * (name_length - len(tokens)))
    return rows, end_positions


class PromptLearner(nn.Module):
    """N learnable context vectors shared by all classes, inserted after the start token.

    The class names are tokenised once (``K`` names incl. ``background``); the
    sequence is ``text_context_length`` long (paper: 13 = 8 contexts + 5 name
    slots). ``forward(clip_model)`` runs the frozen text encoder and returns
    the class text embeddings t, (K, embed_dim).
    """

    def __init__(self, class_names: list[str], prompt_len: int, text_context_length: int, token_width: int,
                 init_std: float = 0.02) -> None:
        super().__init__()
        name_length = text_context_length - prompt_len
        if name_length < 2:
            raise ValueError(f"text context length {text_context_length} leaves no room for class "
                             f"names after {prompt_len} prompt contexts")
        rows, end_positions = class_name_token_ids(class_names, name_length)
        self.prompt_len = prompt_len
        self.register_buffer("name_tokens", torch.tensor(rows, dtype=torch.long), persistent=False)
        # the end token moves right by the number of contexts inserted before it
        self.register_buffer("end_positions", torch.tensor(end_positions, dtype=torch.long) + prompt_len,
                             persistent=False)
        self.contexts = nn.Parameter(torch.empty(prompt_len, token_width))
        # truncated normal at ±2 (absolute, torch's default bounds); the reference calls trunc_normal_ with its
        # default std 1.0 (weakclip/weakclip.py), so there the cut is at ±2 std
        nn.init.trunc_normal_(self.contexts, std=init_std)

    def token_embeddings(self, clip_model: CLIP) -> torch.Tensor:
        """(K, text_context_length, text_width): [SOT], contexts, name tokens, [EOT], padding."""
        names = clip_model.token_embedding(self.name_tokens)  # (K, name_length, width)
        contexts = self.contexts.to(names.dtype).unsqueeze(0).expand(names.shape[0], -1, -1)
        return torch.cat([names[:, :1], contexts, names[:, 1:]], dim=1)

    def forward(self, clip_model: CLIP) -> torch.Tensor:
        return encode_token_embeddings(clip_model, self.token_embeddings(clip_model), self.end_positions)

    @classmethod
    def for_clip(cls, clip_model: CLIP, class_names: list[str], prompt_len: int,
                 text_context_length: int, init_std: float = 0.02) -> "PromptLearner":
        return cls(class_names, prompt_len, text_context_length, text_width(clip_model), init_std)

"""A reward model: the chat model's decoder with a scalar head in place of the language-model head.

    tokens ─► decoder (embeddings, layers, final norm) ─► hidden state of the last real token ─► score ─► r

It reads a whole conversation (prompt and answer, as the chat template writes them) and gives one
number, how good the answer is. Trained on preference pairs with the Bradley-Terry loss
−log σ(r_chosen − r_rejected) (``tinylm.train.objectives.BradleyTerryLoss``), only differences of
rewards mean anything: adding a constant to every reward changes no prediction.

The module tree is transformers' ``LlamaForSequenceClassification`` (and its Qwen2/Qwen3 twins):
``model.*`` is the decoder, ``score.weight`` [1, hidden] the head, with no bias and no ``lm_head``, so the
state dict moves between the two with no renaming. The score is read where transformers reads it: at
each row's rightmost token that is not ``config.pad_token_id`` (so right-padded rows of different
lengths each give their own last token's score). The pad id must therefore be a token the scored
sequences never end with; the reward-model stage picks one the chat template never writes.

The head starts at zero: every reward is 0 and every pair a tie before training (the loss exactly
log 2), whatever the seed, instead of an arbitrary random preference that training must first undo.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from tinylm.model.llama import CausalLM, DecoderModel, ModelConfig


class RewardModel(DecoderModel):
    """Token ids [B, T] in, one reward per row [B] out."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__(config, device=device)
        self.score = nn.Linear(config.hidden_size, 1, bias=False, device=device)
        if device != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.zeros_(self.score.weight)

    @classmethod
    def from_language_model(cls, lm: CausalLM, pad_token_id: int) -> RewardModel:
        """A reward model on ``lm``'s decoder (the very same modules, not a copy; its lm_head is left
        behind) with a zero head; ``pad_token_id`` is where right-padded rows end."""
        config = dataclasses.replace(lm.config, pad_token_id=pad_token_id)
        model = cls(config, device="meta")
        model.model = lm.model
        model.score = nn.Linear(config.hidden_size, 1, bias=False, device=lm.inv_freq.device)
        nn.init.zeros_(model.score.weight)
        model.inv_freq = lm.inv_freq
        return model.train(lm.training)

    def last_token(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each row's position of its rightmost token that is not the pad id [B]: transformers'
        rule (``GenericForSequenceClassification``), so both read the same token whatever the padding."""
        pad = self.config.pad_token_id
        if pad is None:
            if input_ids.shape[0] != 1:
                raise ValueError("the reward model has no pad_token_id, so it cannot tell where padded rows end")
            return torch.full((1,), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
        real = (input_ids != pad).long()
        return (torch.arange(input_ids.shape[1], device=input_ids.device) * real).argmax(-1)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """The reward of each row [B], in float32. Keyword arguments as in ``hidden_states``; rows are
        right-padded with the pad id (causal attention keeps padding out of every real token's view)."""
        hidden = self.hidden_states(input_ids, **kwargs)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        return self.score(hidden[rows, self.last_token(input_ids)]).squeeze(-1).float()

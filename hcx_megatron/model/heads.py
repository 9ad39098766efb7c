"""Scalar (reward / value) head on the HCX decoder: a model factory for `build_model` that puts a
hidden -> 1 projection on the last pipeline stage in place of the LM output layer.

The same module serves the reward model (the score of a sequence is the head's output at its last token)
and PPO's critic (per-token values), so a critic initialised from a reward-model checkpoint loads every key.

Tensor parallelism: the final hidden state on the last stage is complete on every TP rank (without sequence
parallelism) or split along the sequence (with it). The head is tiny, so it is replicated on the TP ranks rather
than split: with sequence parallelism the hidden state is first gathered, with a backward that only takes the
local slice (each TP rank computes the same full gradient, so no reduction is needed and none is applied).
Its checkpoint entry is a TP-replicated tensor (megatron's default for parameters that are not TP-partitioned),
so it reshards across TP/PP like the rest of the model.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from hcx_megatron.config.args import Config
from hcx_megatron.model.builder import ModelFactory, gpt_factory

HEAD_PREFIX = "value_head."


class ScalarHead(torch.nn.Module):
    """hidden -> 1, replicated over TP. Input [s, b, h] (or [s/tp, b, h] under sequence parallelism)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        # Computed in fp32: reward differences of a few hundredths decide the Bradley-Terry gradient.
        out = torch.nn.functional.linear(hidden.float(), self.weight.float(), self.bias.float())
        return out.squeeze(-1)  # [s, b]


class ScalarHeadGPT(GPTModel):
    """GPTModel whose last stage returns per-token scalars [b, s] instead of logits/loss."""

    output_size = 1  # width of the output projection (the training loop's FLOP count reads it; LM: vocabulary)

    def __init__(self, *args, **kwargs):
        kwargs["share_embeddings_and_output_weights"] = False  # no LM output layer to tie to
        super().__init__(*args, **kwargs)
        if self.post_process:
            del self.output_layer  # the vocabulary projection is not used by a reward/value model
            self.value_head = ScalarHead(self.config)

    def _postprocess(self, hidden_states, *args, **kwargs):
        if not self.post_process:
            return hidden_states
        return self.value_head(hidden_states).transpose(0, 1).contiguous()  # [b, s]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # LanguageModule's version post-processes the LM output layer, which this model does not have; the
        # generic per-submodule version is what remains (embedding padding is handled by the embedding itself).
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets,
                                                 ensure_metadata_has_dp_cp_group(metadata))

    def shared_embedding_or_output_weight(self):
        return self.embedding.word_embeddings.weight if self.pre_process else None


def scalar_head_factory(cfg: Config, impl: str) -> ModelFactory:
    """Factory for `build_model(cfg, device, factory=...)`; same decoder as `gpt_factory`."""
    return gpt_factory(cfg, impl, model_cls=ScalarHeadGPT)


def sequence_scores(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reward of each sequence = the head's output at its last real token. values [b, s], lengths [b]."""
    idx = (lengths.long() - 1).clamp(min=0).to(values.device)
    return values.gather(1, idx.view(-1, 1)).squeeze(1)


__all__ = ["ScalarHead", "ScalarHeadGPT", "scalar_head_factory", "sequence_scores", "HEAD_PREFIX"]

"""The Llama-family decoder (Llama, Mistral, Qwen2) over packed tokens, attention via the paged op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from worker.attention import AttentionBackend, AttentionMetadata, SelfAttentionParams
from worker.models.config import ModelConfig
from worker.models.fused_ops import add_rms_norm, rms_norm, rotate_qk, silu_mul
from worker.models.gemm_choice import Packer, PackedProjection, choose_packer
from worker.models.packed_gemm import affordable, plain_matmul
from worker.models.rope import RotaryEmbedding

KVCache = tuple[torch.Tensor, torch.Tensor]


def _weight(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    """Uninitialised inference-only storage; the loader fills it."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             packed: PackedProjection | None = None) -> torch.Tensor:
    """``x @ weight (+ bias)`` for a projection stored ``[in_features, out_features]``, through
    its packed copy when there is one."""
    if packed is not None:
        return packed.matmul(x, bias)
    return plain_matmul(x, weight, bias)


class DecoderLayer(nn.Module):
    """One pre-norm block with fused q/k/v and gate/up projections (one matmul each).

    Projection weights are stored ``[in_features, out_features]``, the transpose of Hugging Face's
    layout: on the CPU, MKL multiplies decode-sized batches (8-48 rows) 1.2-1.5x faster that way
    than ``F.linear`` on ``[out, in]`` weights, and as fast from about 96 rows up.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        c = config
        self.eps = c.rms_norm_eps
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.input_norm = _weight(c.hidden_size, dtype=dtype)
        self.qkv_weight = _weight(c.hidden_size, c.q_size + 2 * c.kv_size, dtype=dtype)
        self.qkv_bias = _weight(c.q_size + 2 * c.kv_size, dtype=dtype) if c.attention_bias else None
        self.o_weight = _weight(c.q_size, c.hidden_size, dtype=dtype)
        self.o_bias = _weight(c.hidden_size, dtype=dtype) if c.o_proj_bias else None
        self.post_norm = _weight(c.hidden_size, dtype=dtype)
        self.gate_up_weight = _weight(c.hidden_size, 2 * c.intermediate_size, dtype=dtype)
        self.down_weight = _weight(c.intermediate_size, c.hidden_size, dtype=dtype)
        self.attn_params = SelfAttentionParams(
            head_num=c.num_attention_heads,
            kv_head_num=c.num_key_value_heads,
            head_dim=c.head_dim,
            qk_scale=c.head_dim**-0.5,
        )
        self.packed: dict[str, PackedProjection] = {}

    def forward(
        self,
        residual: torch.Tensor,
        normed: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv_cache: KVCache,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        next_norm: torch.Tensor,
        output_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``normed`` is ``residual`` after this layer's input norm. Adds the attention and MLP
        outputs to ``residual`` in place (the forward's own buffer, never a weight); returns it
        and it normalised by ``next_norm`` (the next layer's input norm, or the final one).
        With ``output_rows``, every token still writes its K/V, but only those rows go on
        through the output projection and the MLP: both returned tensors hold just them."""
        attended = self._attention(normed, rope, kv_cache, meta, backend)
        if output_rows is not None:
            attended = attended.index_select(0, output_rows)
            residual = residual.index_select(0, output_rows)
        attended = _project(attended, self.o_weight, self.o_bias, self.packed.get("o"))
        mlp_input = add_rms_norm(residual, attended, self.post_norm, self.eps)
        return residual, add_rms_norm(residual, self._mlp(mlp_input), next_norm, self.eps)

    def _attention(self, x, rope, kv_cache, meta, backend) -> torch.Tensor:
        """Attention output ``[T, heads x head_dim]``, before the output projection."""
        tokens = x.shape[0]
        qkv = _project(x, self.qkv_weight, self.qkv_bias, self.packed.get("qkv"))
        q, k = rotate_qk(qkv, *rope, self.num_heads, self.num_kv_heads)
        v = qkv[:, self.q_size + self.kv_size :].reshape(tokens, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.attn_params)
        return out.reshape(tokens, self.q_size)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = _project(x, self.gate_up_weight, packed=self.packed.get("gate_up"))
        return _project(silu_mul(gate_up), self.down_weight, packed=self.packed.get("down"))

    def projections(self) -> dict[str, nn.Parameter]:
        return {"qkv": self.qkv_weight, "o": self.o_weight, "gate_up": self.gate_up_weight,
                "down": self.down_weight}

    def pack_weights(self, pack: Packer) -> None:
        """Pack the projections with ``pack`` (MKL's or oneDNN's), keeping a second copy of
        them. A weight later changed in place through its parameter is used directly (its
        version counter moved); writes through ``.data`` aliases are not seen, so call this
        again after those."""
        # detach(), not .data: it shares the parameter's version counter
        packed = {name: pack(weight.detach()) for name, weight in self.projections().items()}
        self.packed = {name: p for name, p in packed.items() if p is not None}

    def hf_weight_slots(self, prefix: str) -> dict[str, torch.Tensor]:
        """Where each Hugging Face tensor of this layer lands in the fused layout: views, the
        projections' transposed to Hugging Face's ``[out, in]``."""
        q, kv = self.q_size, self.kv_size
        inter = self.down_weight.shape[0]
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        slots = {
            f"{prefix}.input_layernorm.weight": self.input_norm.data,
            f"{prefix}.post_attention_layernorm.weight": self.post_norm.data,
            f"{attn}.q_proj.weight": self.qkv_weight.data[:, :q].t(),
            f"{attn}.k_proj.weight": self.qkv_weight.data[:, q : q + kv].t(),
            f"{attn}.v_proj.weight": self.qkv_weight.data[:, q + kv :].t(),
            f"{attn}.o_proj.weight": self.o_weight.data.t(),
            f"{mlp}.gate_proj.weight": self.gate_up_weight.data[:, :inter].t(),
            f"{mlp}.up_proj.weight": self.gate_up_weight.data[:, inter:].t(),
            f"{mlp}.down_proj.weight": self.down_weight.data.t(),
        }
        if self.qkv_bias is not None:
            slots[f"{attn}.q_proj.bias"] = self.qkv_bias.data[:q]
            slots[f"{attn}.k_proj.bias"] = self.qkv_bias.data[q : q + kv]
            slots[f"{attn}.v_proj.bias"] = self.qkv_bias.data[q + kv :]
        if self.o_bias is not None:
            slots[f"{attn}.o_proj.bias"] = self.o_bias.data
        return slots


class LlamaForCausalLM(nn.Module):
    """Decoder over packed tokens (no batch dim); every layer's attention goes through ``backend``.

    Serves LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM checkpoints: they differ only
    in config (q/k/v bias, tied embeddings, rope parameters).
    """

    def __init__(self, config: ModelConfig, backend: AttentionBackend, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.dtype = dtype
        c = config
        self.embed_tokens = _weight(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(c, dtype) for _ in range(c.num_hidden_layers))
        self.norm = _weight(c.hidden_size, dtype=dtype)
        self.lm_head = self.embed_tokens if c.tie_word_embeddings else _weight(c.vocab_size, c.hidden_size, dtype=dtype)
        self.rotary = RotaryEmbedding(c)
        self.packed_lm_head: PackedProjection | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        output_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm, or only the ``output_rows`` of
        them; writes this step's K/V of every token into the caches.

        Rows that are not output (a prompt's tokens before its last) skip the last layer's
        output projection and MLP: nothing reads them, and on a long prefill that is a tenth
        of the step's matmuls. ``meta`` must already have been through ``backend.prepare``
        (the runner does it once per step).
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} per-layer KV caches, got {len(kv_caches)}")
        rope = self.rotary.cos_sin(positions, self.dtype)
        residual = F.embedding(input_ids, self.embed_tokens)
        normed = rms_norm(residual, self.layers[0].input_norm, self.config.rms_norm_eps)
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.norm]
        last = len(self.layers) - 1
        for i, (layer, kv_cache, next_norm) in enumerate(zip(self.layers, kv_caches, next_norms)):
            residual, normed = layer.forward(residual, normed, rope, kv_cache, meta, self.backend,
                                             next_norm, output_rows if i == last else None)
        return normed

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` for the given hidden rows (e.g. each sequence's last token)."""
        if self.packed_lm_head is not None:
            return self.packed_lm_head.matmul(hidden)
        return F.linear(hidden, self.lm_head).float()

    @property
    def gemm_kind(self) -> str:
        """Whose packed GEMM the projections run through: ``mkl``, ``onednn`` or ``torch``."""
        return self.packed_lm_head.kind if self.packed_lm_head is not None else "torch"

    def pack_weights(self) -> None:
        """Pack every projection and the lm_head for the faster of MKL's and oneDNN's packed
        GEMM on this host (float32 on the CPU; elsewhere nothing happens; see
        :meth:`DecoderLayer.pack_weights`). Skipped when the copies would not fit the host
        memory share (:func:`affordable`)."""
        if self.dtype != torch.float32 or self.lm_head.device.type != "cpu":
            return
        weights = [w for layer in self.layers for w in layer.projections().values()]
        if not affordable(sum(w.nbytes for w in weights + [self.lm_head])):
            return
        pack = choose_packer([w.detach() for w in weights])
        if pack is None:
            return
        for layer in self.layers:
            layer.pack_weights(pack)
        self.packed_lm_head = pack(self.lm_head.detach().t())

    def hf_weight_slots(self) -> dict[str, torch.Tensor]:
        """Every Hugging Face tensor name this model needs, mapped to the view it is copied into."""
        slots = {"model.embed_tokens.weight": self.embed_tokens.data, "model.norm.weight": self.norm.data}
        if not self.config.tie_word_embeddings:
            slots["lm_head.weight"] = self.lm_head.data
        for i, layer in enumerate(self.layers):
            slots.update(layer.hf_weight_slots(f"model.layers.{i}"))
        return slots

"""The attention side of the actor graph: embeddings, attention, norms, shared experts and the LM head.

`AttentionWorker` holds the model without its gates and routed experts, and the paged (MLA: latent) KV
cache of the sequences assigned to it. Its MoE blocks' backend hands each layer's hidden states to the
router over a link and returns a pending result, so the shared experts run while the routed ones do. A
step's sequences come as up to two micro-batches, run on two threads: while one waits for its routed
experts, the other computes attention (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from expertmesh.actors.step import AdapterSpec, MicroBatch
from expertmesh.model import AttentionMetadata, load_model, resolve_dtype
from expertmesh.model.adapters import ModelAdapters
from expertmesh.model.moe import MoEBlock
from expertmesh.model.quantize import check_checkpoint_quantizable, quantize_model


class AttentionWorker:
    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", num_blocks: int, block_size: int,
                 device: str | torch.device = "cpu", lora: AdapterSpec | None = None,
                 kv_cache_dtype: str = "auto", quantization: str | None = None, activation_dtype: str = "auto"):
        # Each micro-batch always runs on its own long-lived thread, whichever thread the actor call came in on:
        # a new calling thread would get a fresh OpenMP team (measured: 25% slower steps).
        self._threads = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"micro-batch-{i}") for i in range(2)]
        # The model is built on the thread that runs micro-batch 0 (the only one where ping-pong is off):
        # a model built on one thread and run on another decoded 15-25% slower here (see AsyncEngine).
        self.device = torch.device(device)
        self.model = self._threads[0].submit(load_model, model_dir, dtype, str(self.device), routed_experts=False,
                                             activation_dtype=activation_dtype).result()
        if quantization is not None:  # attention, shared experts, dense layers, LM head (the shards: the experts)
            check_checkpoint_quantizable(model_dir, quantization)
            self._threads[0].submit(quantize_model, self.model, quantization).result()
        self.block_size = block_size
        cache_dtype = None if kv_cache_dtype == "auto" else resolve_dtype(kv_cache_dtype)  # "auto": the model's
        self.kv_caches = self._threads[0].submit(self.model.allocate_kv_cache, num_blocks, block_size,
                                                 cache_dtype).result()
        # LoRA adapters of attention, shared experts and dense layers (the shards hold the routed experts')
        lora = lora or AdapterSpec(0, 16, {})
        self.adapters = ModelAdapters(self.model, lora.max_loras, lora.max_rank, routed=False)
        for slot, path in lora.loaded.items():  # a replacement actor takes the adapters back
            self.adapters.load(slot, path)
        self.link = None  # set by the actor graph: a link of expertmesh.transport (gRPC or collective)
        self._context = threading.local()  # (step, micro-batch) of the forward pass on this thread
        for layer in self.model.model.layers:
            if isinstance(layer.mlp, MoEBlock):
                layer.mlp.backend = self._routed
        self._waits: list[float] = []  # seconds blocked on routed experts in the current step
        # (step seconds, of which blocked on routed experts summed over micro-batch threads) per recent step
        self.timings: deque[tuple[float, float]] = deque(maxlen=1024)

    def _routed(self, layer_idx: int, block: MoEBlock, hidden: torch.Tensor):
        # the data plane carries host tensors; the routed output comes back to this actor's device
        pending = self.link.submit(self._context.step, self._context.micro_batch, layer_idx, hidden.cpu())
        return _TimedWait(pending, self._waits, self.device)

    @torch.inference_mode()
    def _forward(self, step: int, index: int, mb: MicroBatch) -> torch.Tensor:
        self._context.step, self._context.micro_batch = step, index
        meta = AttentionMetadata.build(
            query_lens=mb.query_lens, context_lens=mb.context_lens, block_tables=mb.block_tables,
            block_size=self.block_size, device=self.device,
        )
        ids = torch.tensor(mb.input_ids, dtype=torch.int64, device=self.device)
        rows = torch.tensor(mb.logits_indices, dtype=torch.int64, device=self.device)
        slots = None if mb.token_slots is None else torch.tensor(mb.token_slots, dtype=torch.int64, device=self.device)
        with self.adapters.serving(slots):
            return self.model(ids, meta, self.kv_caches, rows).cpu()

    def execute(self, step: int, micro_batches: list[MicroBatch | None]) -> list[torch.Tensor | None]:
        """Logits [rows, V] per micro-batch, on the CPU (None where this actor has none of it)."""
        if self.link is None:
            raise RuntimeError("the attention actor is not connected to a router")
        self.link.start_step(step)
        started, self._waits = time.perf_counter(), []
        work = [(i, mb) for i, mb in enumerate(micro_batches) if mb is not None and mb.num_tokens]
        out: list[torch.Tensor | None] = [None] * len(micro_batches)
        if not work:
            return out
        futures = [(i, self._threads[i].submit(self._forward, step, i, mb)) for i, mb in work]
        error = None
        for i, fut in futures:
            try:
                out[i] = fut.result()
            except BaseException as e:  # tell the other micro-batch's waits, so they fail rather than hang
                self.link.fail(step, f"attention micro-batch {i} failed: {e}")
                error = error or e
        if error is not None:
            raise error
        self.timings.append((time.perf_counter() - started, sum(self._waits)))
        return out


class _TimedWait:
    """A pending routed output that adds the time its `wait` blocks to a step's tally."""

    def __init__(self, pending, tally: list[float], device: torch.device):
        self.pending, self.tally, self.device = pending, tally, device

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.pending.wait().to(self.device)
        finally:
            self.tally.append(time.perf_counter() - start)

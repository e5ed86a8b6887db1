"""Generation with an optimized module: prefill the prompts into a `DecodeState`, then decode one
token per step with the same rewritten program, sampling each next token.

Prompts of different lengths run as one batch, left-aligned (padding first): positions count real
tokens only, padded slots are never attended to and never change a recurrent state. A model that
computes positions itself from the sequence length (no `position_ids` input) cannot shift them per
row, so its prompts are grouped by length and each group runs as its own batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from rewrite.decode import fusion_switches
from rewrite.decode.program import DecodeProgram
from rewrite.decode.sampling import Sampling, next_tokens
from rewrite.errors import RewriteError

CUDA_GRAPH_MODES = ("auto", "always", "never")
COMPILE_STEP_CHOICES = (False, True)


class StepTokens(NamedTuple):
    """The tokens one decode step produced: `tokens[i]` continues row `rows[i]` of the batch."""

    rows: torch.Tensor
    tokens: torch.Tensor


def decode_program(om: Any) -> DecodeProgram:
    """The decode program of optimized module `om` (built on first use, rebuilt after a move or cast or
    when a decode fusion's switch changes, `fusion_switches.SWITCHES`: then from the capture the last build kept,
    which only a move or cast makes again)."""
    source = om.source
    if source is None:
        raise RewriteError("generate() needs the source model to capture its decode program; load the module "
                           "with rewrite.load(path, model=...)")
    first = next(iter(om.parameters()), None)
    key = (id(om.plan), first.device if first is not None else None, first.dtype if first is not None else None,
           fusion_switches.current())
    cached = om.__dict__.get("_decode_program")
    if cached is not None and cached[0] == key:
        return cached[1]
    mine = dict(om.named_buffers())
    for name, buf in list(source.named_buffers()):  # buffers the module moved or cast, as its own capture does
        if name in mine and (mine[name].device != buf.device or mine[name].dtype != buf.dtype):
            owner, _, leaf = name.rpartition(".")
            (source.get_submodule(owner) if owner else source)._buffers[leaf] = mine[name]
    parameters = dict(om.named_parameters())
    kept = om.__dict__.get("_decode_threaded")  # the capture before fusions: switches changed, not captured again
    threaded = kept[1] if kept is not None and kept[0] == key[:3] else None
    program = DecodeProgram(source, om.plan, parameters, threaded)
    om.__dict__["_decode_threaded"] = (key[:3], program.threaded)
    om.__dict__["_decode_program"] = (key, program)
    return program


def stop_ids(om: Any, eos_token_id: int | list[int] | torch.Tensor | None,
             pad_token_id: int | torch.Tensor | None) -> tuple[list[int], int]:
    """(eos ids, pad id) a generation uses: the arguments, else the source model's generation config
    (as Hugging Face's `generate` does); pass `eos_token_id=[]` to never stop early. The pad id
    defaults to the model's pad id, else the first eos id, else 0."""
    source = om.source
    config = getattr(source, "generation_config", None) or getattr(source, "config", None)
    if eos_token_id is None and config is not None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if pad_token_id is None and config is not None:
        pad_token_id = getattr(config, "pad_token_id", None)
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if isinstance(pad_token_id, torch.Tensor):
        pad_token_id = int(pad_token_id)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else [int(i) for i in (eos_token_id or [])]
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    return eos, int(pad)


def _model_pad(om: Any, pad: int) -> int:
    """The id the model is fed where the output shows `pad` (padded prompt positions, rows that ended):
    `pad` itself when it is a token of the model's vocabulary, else 0. Those positions are never attended
    to and their outputs are dropped, so any token serves; a pad id outside the vocabulary (a config's eos
    of a larger tokenizer) would fail the embedding lookup."""
    vocab = getattr(getattr(om.source, "config", None), "vocab_size", None)
    return pad if not isinstance(vocab, int) or 0 <= pad < vocab else 0


def _left_aligned(ids: torch.Tensor, mask: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids / mask with each row's real tokens moved to the end (padding first)."""
    real = mask.bool()
    lengths = real.sum(-1)
    for row in range(ids.shape[0]):
        idx = real[row].nonzero().flatten()
        if idx.numel() == 0:
            raise RewriteError(f"attention_mask row {row} has no real token; every prompt needs at least one")
        if idx[-1] - idx[0] + 1 != idx.numel():
            raise RewriteError(f"attention_mask row {row} has padding between real tokens; pad only before or "
                               "after each prompt")
    order = torch.sort(real.long(), dim=-1, stable=True).indices  # pads first, real tokens in order
    aligned = torch.where(real.gather(-1, order), ids.gather(-1, order), torch.full_like(ids, pad))
    columns = torch.arange(ids.shape[1], device=ids.device)
    return aligned, columns[None, :] >= (ids.shape[1] - lengths)[:, None]


def _run(
    program: DecodeProgram,
    ids: torch.Tensor,
    valid: torch.Tensor,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    eos: torch.Tensor | None,
    pad: int,
    feed: int,
    generator: torch.Generator | None,
    graphs: bool,
    compiled: bool,
) -> Iterator[torch.Tensor]:
    """Yield [B] new tokens per step for left-aligned prompts `ids` [B, L] (`valid` marks real tokens);
    a row that produced an eos id yields `pad` afterwards, and the model is fed `feed` for it."""
    batch, length = ids.shape
    state = program.new_state(batch, length + max_new_tokens)
    prompt_valid = None if bool(valid.all()) else valid
    positions = state.positions(length, prompt_valid)
    state.begin(length, prompt_valid)
    logits = program(ids, positions, state)[:, -1]
    state.advance()
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda i, p: program(i, p, state)  # noqa: E731
    if graphs:
        from rewrite.decode.cuda_graph import GraphedStep

        graphed = GraphedStep(program, state, compiled=compiled)
        graphed.start()
        step = graphed
    elif compiled:
        from rewrite.decode.compiled import CompiledStep

        state.start_static()
        step = CompiledStep(program, state)
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    for i in range(max_new_tokens):
        token = next_tokens(logits, sampling, generator)
        fed = token
        if eos is not None:
            done = finished
            token = torch.where(done, torch.full_like(token, pad), token)
            fed = token if feed == pad else torch.where(done, torch.full_like(token, feed), token)
            finished = done | torch.isin(token, eos)
        yield token
        if i == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            return
        positions = state.positions(1)
        state.begin(1)
        logits = step(fed[:, None], positions)[:, -1]
        state.advance()


def stream(
    om: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: str | None = None,
    compile_step: bool = False,
) -> Iterator[StepTokens]:
    """Yield the new tokens of each decode step as they are produced (see `generate` for the arguments)."""
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor [batch, tokens]")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
    if not isinstance(compile_step, bool):
        raise ValueError(f"compile_step must be one of {', '.join(map(str, COMPILE_STEP_CHOICES))}, "
                         f"got {compile_step!r}")
    program = decode_program(om)
    mode = cuda_graph or _plan_cuda_graph(om)
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"cuda_graph must be one of {', '.join(CUDA_GRAPH_MODES)}, got {mode!r}")
    device = program.new_state(1, 1).device
    if mode == "always" and device.type != "cuda":
        raise RewriteError(f"cuda_graph='always' needs the model on a CUDA device, it is on {device}")
    graphs = mode != "never" and device.type == "cuda"
    eos_list, pad = stop_ids(om, eos_token_id, pad_token_id)
    eos = torch.tensor(eos_list, device=device) if eos_list else None
    ids = input_ids.to(device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    feed = _model_pad(om, pad)
    ids, valid = _left_aligned(ids, mask, feed)
    lengths = valid.sum(-1)
    if program.positions_in_graph and bool((lengths != lengths[0]).any()):
        groups = [(lengths == n).nonzero().flatten() for n in torch.unique(lengths).tolist()]
    else:
        groups = [torch.arange(ids.shape[0], device=device)]
    with torch.no_grad():
        for rows in groups:
            width = int(lengths[rows].max())
            runner = _run(program, ids[rows, -width:], valid[rows, -width:], max_new_tokens=max_new_tokens,
                          sampling=sampling, eos=eos, pad=pad, feed=feed, generator=generator, graphs=graphs,
                          compiled=compile_step)
            for token in runner:
                yield StepTokens(rows, token)


def _plan_cuda_graph(om: Any) -> str:
    for spec in om.plan.enabled_passes:
        if spec.name == "stateful":
            return spec.options.cuda_graph
    return "auto"


def generate(
    om: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[StepTokens], None] | None = None,
    cuda_graph: str | None = None,
    compile_step: bool = False,
) -> torch.Tensor:
    """Continue each prompt of `input_ids` [B, L] by up to `max_new_tokens` tokens.

    Returns [B, L + n]: the prompts left-aligned (padding first, `attention_mask` 0 marks padding on
    either side) followed by the new tokens; a row that produced an `eos_token_id` is filled with
    `pad_token_id` after it, and generation stops once every row has. Both default to the source
    model's generation config where it has one, as in Hugging Face's `generate` (pad: else the first
    eos id, else 0); `eos_token_id=[]` never stops early.
    Greedy unless `do_sample`; then `temperature`, `top_k`, `top_p` shape the distribution and
    `generator` seeds it. `streamer` receives each step's `StepTokens` as soon as they exist.
    `cuda_graph` ("auto", "always", "never"; default from the plan's `stateful` options) replays the
    one-token step from a CUDA graph on CUDA. `compile_step` (default False) compiles the one-token
    step with torch.compile (Inductor, static shapes: once per batch size, per capacity with a full
    KV cache and, with layer-skip routers, per set of decisions held from the prefill) so its
    elementwise ops fuse; on CUDA the compiled step is what the graph replays. Layer-skip decisions
    are made at prefill and held, so a routed program's step is as static as any other.
    """
    eos_list, fill = stop_ids(om, eos_token_id, pad_token_id)  # resolved once; stream keeps resolved ids as given
    steps = stream(
        om, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=eos_list, pad_token_id=fill, generator=generator,
        cuda_graph=cuda_graph, compile_step=compile_step,
    )
    per_row: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
    device = input_ids.device
    for step in steps:
        if streamer is not None:
            streamer(step)
        device = step.tokens.device
        for row, token in zip(step.rows.tolist(), step.tokens, strict=True):
            per_row[row].append(token)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    aligned, _ = _left_aligned(input_ids.to(device), mask.to(device), fill)
    width = max(len(tokens) for tokens in per_row)
    new = torch.full((input_ids.shape[0], width), fill, dtype=aligned.dtype, device=device)
    for row, tokens in enumerate(per_row):
        if tokens:
            new[row, : len(tokens)] = torch.stack(tokens)
    return torch.cat([aligned, new], dim=1)
